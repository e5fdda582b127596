"""A character-level tokenizer built in code (nothing downloaded).

Every character of a fixed alphabet is one token; four special tokens
(``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``) come first. It is a
:class:`transformers.PreTrainedTokenizer`, so ``save_pretrained`` /
``from_pretrained``, padding (left padding for generation), ``decode`` and
``batch_decode`` work as for any Hugging Face tokenizer. nanochat and nanoGPT
use the same trick (a byte/char tokenizer) for fully offline tests.

Two options give it a real chat model's shapes without a download
(``builtin:qwen-shapes``): ``chat=True`` adds ChatML's ``<|im_start|>`` and
``<|im_end|>`` as special tokens and a ChatML chat template, whose turns end
in ``<|im_end|>``, not in the EOS token (as Qwen2.5-Instruct's end in
``<|im_end|>``, not ``<|endoftext|>``); ``vocab_size=N`` pads the vocabulary
with unused ``<extra_i>`` tokens to N ids (Qwen2.5's embedding has 151,936 rows).
"""

from __future__ import annotations

import json
import os
import string
from typing import Any

from transformers import PreTrainedTokenizer

__all__ = ["CharTokenizer", "DEFAULT_ALPHABET", "CHATML_TEMPLATE"]

#: Printable ASCII without the vertical tab / form feed; enough for arithmetic and short English prompts.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

VOCAB_FILE = "char_vocab.json"

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

#: ChatML, as Qwen2.5-Instruct writes it (without its default system message): a turn ends in ``<|im_end|>``.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CharTokenizer(PreTrainedTokenizer):
    """One token per character of ``alphabet``; unknown characters map to ``<unk>``.

    >>> tok = CharTokenizer()
    >>> tok.decode(tok("12+3=")["input_ids"], skip_special_tokens=True)
    '12+3='
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        alphabet: str | None = None,
        *,
        chat: bool = False,
        vocab_size: int = 0,
        **kwargs: Any,
    ) -> None:
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            alphabet, chat, vocab_size = saved["alphabet"], saved.get("chat", False), saved.get("vocab_size", 0)
        alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has repeated characters")
        self.alphabet, self.chat, self.padded_size = alphabet, chat, vocab_size
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        tokens = specials + list(alphabet) + (list(CHAT_TOKENS) if chat else [])  # characters keep their ids
        if vocab_size:
            if vocab_size < len(tokens):
                raise ValueError(f"CharTokenizer vocab_size {vocab_size} is below its {len(tokens)} tokens")
            tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]  # never produced from text
        self._vocab = {tok: i for i, tok in enumerate(tokens)}
        self._inverse = dict(enumerate(tokens))
        if chat:  # special: split out of the text whole (not as characters), dropped by skip_special_tokens
            kwargs.setdefault("extra_special_tokens", list(CHAT_TOKENS))
            kwargs.setdefault("chat_template", CHATML_TEMPLATE)
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("bos_token", "<bos>")
        kwargs.setdefault("eos_token", "<eos>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("padding_side", "left")  # decoder-only generation pads on the left
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._vocab["<unk>"])

    def _convert_id_to_token(self, index: int) -> str:
        return self._inverse.get(int(index), "<unk>")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # A BOS before the prompt; EOS is what the model learns to emit, never appended to prompts.
        ids = [self.bos_token_id] + token_ids_0
        return ids if token_ids_1 is None else ids + token_ids_1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"alphabet": self.alphabet, "chat": self.chat, "vocab_size": self.padded_size}, handle)
        return (path,)
