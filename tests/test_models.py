"""The character tokenizer, the built-in tiny Llama and model loading."""

from __future__ import annotations

import os

import pytest
import torch

from ebpo.models import CharTokenizer, TinyLlamaSpec, build_tiny_llama, check_model_source, load_policy


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = CharTokenizer()
    ids = tok("12*3=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12*3="
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.convert_tokens_to_ids("\u00e9") == tok.unk_token_id
    tok.save_pretrained(tmp_path)
    again = CharTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab() and again("ab")["input_ids"] == tok("ab")["input_ids"]


def test_tokenizer_pads_on_the_left():
    tok = CharTokenizer()
    batch = tok(["1=", "123="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_tiny_llama_size_and_seeding():
    tok = CharTokenizer()
    a = build_tiny_llama(TinyLlamaSpec(), tok, seed=0)
    b = build_tiny_llama(TinyLlamaSpec(), tok, seed=0)
    c = build_tiny_llama(TinyLlamaSpec(), tok, seed=1)
    params = sum(p.numel() for p in a.parameters())
    assert 100_000 < params < 1_000_000
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    state = torch.get_rng_state()
    build_tiny_llama(TinyLlamaSpec(), tok, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # building never consumes the run's RNG


def test_saved_builtin_model_reloads_with_its_tokenizer(tmp_path):
    model, tok = load_policy("builtin:tiny", device=torch.device("cpu"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_policy(str(tmp_path), device=torch.device("cpu"))
    assert isinstance(tok2, CharTokenizer)
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("builtin:huge", "unknown built-in model"),
        ("/definitely/not/here", "is not a directory"),
        ("a/b/c", "neither an existing directory nor a hub id"),
    ],
)
def test_bad_model_sources(name, message):
    with pytest.raises(ValueError, match=message):
        check_model_source(name)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        check_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    os.chmod(tmp_path / "config.json", 0)
    if os.access(tmp_path / "config.json", os.R_OK):  # running as root: permissions are not enforced
        pytest.skip("file permissions not enforced for this user")
    with pytest.raises(ValueError, match="not readable"):
        check_model_source(str(tmp_path))


@pytest.mark.parametrize("module", ["ebpo.models.tokenizer", "ebpo.verifiers.exact"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_chat_tokenizer_pads_its_vocabulary_and_splits_chat_tokens_whole(tmp_path):
    tok = CharTokenizer(chat=True, vocab_size=1000)
    assert len(tok) == tok.vocab_size == 1000
    text = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"  # ChatML, as Qwen2.5 writes it
    ids = tok(text, add_special_tokens=False)["input_ids"]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (ids.count(im_start), ids.count(im_end), len(ids)) == (2, 1, len("user\n1+2=\nassistant\n") + 3)
    assert tok.decode(ids, skip_special_tokens=True) == "user\n1+2=\nassistant\n"
    assert tok("ab")["input_ids"] == CharTokenizer()("ab")["input_ids"]  # characters keep their ids
    tok.save_pretrained(tmp_path)
    again = CharTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab() and again.chat_template == tok.chat_template
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(ValueError, match="below"):
        CharTokenizer(vocab_size=50)


def test_builtin_qwen_shapes_has_qwens_vocabulary_and_end_of_turn_ids(tmp_path):
    """Qwen2.5-Instruct: 151,936 embedding rows; a turn ends in <|im_end|>, which is not the tokenizer's EOS,
    and the generation config lists both. Saved and loaded back, it keeps all three."""
    from ebpo.sampling import end_of_turn_ids

    model, tok = load_policy("builtin:qwen-shapes", device=torch.device("cpu"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.vocab_size == len(tok) == 151_936 and im_end != tok.eos_token_id
    assert model.generation_config.eos_token_id == [im_end, tok.eos_token_id]
    assert end_of_turn_ids(model, tok) == sorted([im_end, tok.eos_token_id])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_policy(str(tmp_path), device=torch.device("cpu"))
    assert again.generation_config.eos_token_id == [im_end, tok.eos_token_id]
    assert len(tok2) == 151_936 and tok2.chat_template == tok.chat_template
