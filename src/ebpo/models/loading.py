"""Build the built-in tiny Llama, or load any Hugging Face causal LM.

``load_policy(name)`` understands three kinds of name:

* ``"builtin:tiny"`` (the default): a freshly initialised
  :class:`transformers.LlamaForCausalLM` of a few hundred thousand parameters
  with the :class:`~ebpo.models.tokenizer.CharTokenizer`; nothing is downloaded.
  ``"builtin:medium"`` is the same recipe at ~40 M parameters, large enough
  to exercise a GPU (``scripts/gpu-check.sh``); see :data:`BUILTIN_SPECS`.
  ``"builtin:qwen-shapes"`` has a real chat model's shapes around a tiny
  core: Qwen2.5's vocabulary size (151,936 ids, the character tokenizer
  padded), a ChatML template whose turns end in ``<|im_end|>`` and a
  generation config that lists ``<|im_end|>`` and EOS, as Qwen2.5-Instruct's
  does (the trainer's real-shapes test runs it).
* a local directory written by ``save_pretrained`` (an ebpo checkpoint, or
  any HF model): loaded with ``AutoModelForCausalLM``; a directory whose
  tokenizer config names ``CharTokenizer`` gets that tokenizer back.
* a Hugging Face hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``): loaded with
  ``AutoModelForCausalLM`` / ``AutoTokenizer``; bf16 on GPU.

Optional LoRA adapters go through ``peft`` when it is installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ebpo.fileio import short
from ebpo.models.tokenizer import CharTokenizer

__all__ = [
    "TinyLlamaSpec",
    "BUILTIN_SPECS",
    "builtin_spec",
    "build_tiny_llama",
    "load_policy",
    "load_tokenizer",
    "select_device",
    "check_model_source",
    "check_model_dir",
    "resolve_dtype",
]

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Architecture of the built-in model (defaults: ~0.4 M parameters)."""

    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64


# The built-in models by name (``builtin:<name>``); the character tokenizer is the same for all.
BUILTIN_SPECS: dict[str, TinyLlamaSpec] = {
    "tiny": TinyLlamaSpec(),  # ~0.4 M parameters: CPU runs in minutes
    "medium": TinyLlamaSpec(
        hidden_size=512, num_layers=12, num_heads=8, intermediate_size=1536, max_positions=256
    ),  # ~41 M
    # Qwen2.5-Instruct's vocabulary and end-of-turn tokens (BUILTIN_TOKENIZERS) around a tiny core (~4.9 M
    # parameters, nearly all of them the tied 151,936 x 32 embedding): the LM head's shape is a real one.
    "qwen-shapes": TinyLlamaSpec(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=1024),
}

# The character tokenizer's options of each built-in model (the default alphabet without chat tokens when absent).
BUILTIN_TOKENIZERS: dict[str, dict[str, Any]] = {"qwen-shapes": {"chat": True, "vocab_size": 151_936}}


def builtin_spec(name: str) -> TinyLlamaSpec:
    """The architecture of ``builtin:<size>`` (ValueError naming the sizes when unknown)."""
    size = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if size not in BUILTIN_SPECS:
        raise ValueError(
            f"unknown built-in model {name!r}; choose one of {[BUILTIN_PREFIX + k for k in BUILTIN_SPECS]}"
        )
    return BUILTIN_SPECS[size]


def build_tiny_llama(spec: TinyLlamaSpec, tokenizer: CharTokenizer, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama whose vocabulary matches ``tokenizer`` (seeded, CPU)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    # Initialise under a local seed so the global RNG stream of the run is not consumed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if getattr(tokenizer, "chat", False):  # a turn ends in <|im_end|> or EOS, as Qwen2.5-Instruct's config says
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    return model


def select_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc


def _is_char_tokenizer_dir(path: str) -> bool:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise ValueError(f"tokenizer config {config_path} is corrupt or truncated ({reason})") from None
    return isinstance(config, dict) and config.get("tokenizer_class") == CharTokenizer.__name__


def _looks_like_a_path(name: str, expanded: str) -> bool:
    """Whether ``name`` is meant as a local path (so it must never be sent to the hub, which would retry the
    network for a minute before failing): absolute, ``./``, ``../``, ``~``, a trailing or Windows separator,
    an existing path, or a first component that is an existing local directory (``runs/missing`` when
    ``runs/`` is here). ``owner/name`` with no such directory is a hub id: a hub id has that very shape."""
    if os.path.isabs(expanded) or name.startswith((".", "~")) or os.path.exists(expanded):
        return True
    if name.endswith(("/", os.sep)) or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(first)


def check_model_source(name: str) -> None:
    """Fail early (ValueError) when ``name`` can be neither a local model nor a hub id.

    A name that looks like a path (:func:`_looks_like_a_path`) must be a
    directory with a ``config.json`` (or a LoRA adapter's
    ``adapter_config.json``) and is never looked up on the hub; anything else
    must look like a hub id ``owner/name`` or ``name``. Whether a hub id
    exists is only known when it is downloaded.
    """
    if name.startswith(BUILTIN_PREFIX):
        builtin_spec(name)
        return
    expanded = os.path.expanduser(name)
    if _looks_like_a_path(name, expanded):
        if not os.path.isdir(expanded):
            what = "does not exist" if not os.path.exists(expanded) else "is a file"
            raise ValueError(
                f"model path {short(name)} is not a directory ({what}; a name that looks like a path is never looked "
                "up on the Hugging Face hub); pass a directory written by save_pretrained or a hub id like 'owner/name'"
            )
        config = next(
            (f for f in ("config.json", "adapter_config.json") if os.path.isfile(os.path.join(expanded, f))), None
        )
        if config is None:
            raise ValueError(
                f"model path {short(name)} has no config.json; pass a directory written by save_pretrained or a hub id"
            )
        if not os.access(os.path.join(expanded, config), os.R_OK):
            raise ValueError(f"model path {short(name)} is not readable; check its permissions")
        return
    parts = name.split("/")
    if len(parts) > 2 or any(not part or part.strip() != part for part in parts):
        raise ValueError(f"model {short(name)} is neither an existing directory nor a hub id like 'owner/name'")


def check_model_dir(model_dir: str, *, what: str = "model directory") -> None:
    """ValueError naming the file when ``model_dir`` lacks its config or weights or holds a corrupt one.

    Reads the config(s) as JSON (UTF-8) and the header of every ``*.safetensors`` file, which covers
    truncation (safetensors checks the data length against the header). A model saved as ``.bin`` only is
    not checked here (transformers loads it, or says why). Writes nothing.
    """
    configs = [n for n in ("config.json", "adapter_config.json") if os.path.isfile(os.path.join(model_dir, n))]
    names = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    weights = [n for n in names if n.endswith(".safetensors")]
    if not configs or not (weights or any(n.endswith(".bin") for n in names)):
        raise ValueError(f"{what} has no model (config and *.safetensors weights in {model_dir}); it is incomplete")
    for name in configs:
        try:
            with open(os.path.join(model_dir, name), encoding="utf-8") as handle:
                if not isinstance(json.load(handle), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise ValueError(
                f"model config {os.path.join(model_dir, name)} is corrupt or truncated ({reason})"
            ) from None
    from safetensors import safe_open

    for name in weights:
        try:
            with safe_open(os.path.join(model_dir, name), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every malformed file
            reason = " ".join(str(exc).split())[:160]
            raise ValueError(
                f"model weights {os.path.join(model_dir, name)} are corrupt or truncated ({reason})"
            ) from None


def load_tokenizer(name: str) -> Any:
    """The tokenizer for ``name`` (CharTokenizer for the built-in model and its checkpoints), padding on the left."""
    expanded = os.path.expanduser(name)
    if name.startswith(BUILTIN_PREFIX):
        builtin_spec(name)  # a known size
        tokenizer: Any = CharTokenizer(**BUILTIN_TOKENIZERS.get(name[len(BUILTIN_PREFIX) :], {}))
    elif os.path.isdir(expanded) and _is_char_tokenizer_dir(expanded):
        tokenizer = CharTokenizer.from_pretrained(expanded)
    else:
        tokenizer = AutoTokenizer.from_pretrained(expanded)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # many causal LMs ship without a pad token; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name: str,
    *,
    device: torch.device,
    dtype: str = "auto",
    spec: TinyLlamaSpec | None = None,
    seed: int = 0,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
) -> tuple[PreTrainedModel, Any]:
    """Return ``(model, tokenizer)`` on ``device``.

    ``dtype`` is the dtype the weights are *stored* in: ``"auto"`` means
    bf16 on CUDA, fp32 elsewhere (right for inference). The trainer stores
    trained weights in fp32 and computes in ``--dtype`` under autocast
    (:mod:`ebpo.train.distributed`). ``lora_rank > 0`` wraps the model with
    peft LoRA adapters on every linear projection.
    """
    check_model_source(name)
    if not name.startswith(BUILTIN_PREFIX) and os.path.isdir(os.path.expanduser(name)):
        check_model_dir(os.path.expanduser(name), what=f"model directory {name}")  # a corrupt file: one line
    tokenizer = load_tokenizer(name)
    torch_dtype = resolve_dtype(dtype, device)
    if name.startswith(BUILTIN_PREFIX):
        model: PreTrainedModel = build_tiny_llama(spec or builtin_spec(name), tokenizer, seed=seed).to(torch_dtype)
    elif is_adapter_dir(name):  # a LoRA checkpoint: its base model plus the adapter, merged
        model = load_adapter(name, dtype=torch_dtype, trainable=False).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=torch_dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora_rank > 0:
        model = add_lora(model, lora_rank, lora_alpha)
    return model.to(device), tokenizer


def is_adapter_dir(path: str) -> bool:
    """A directory written by peft's ``save_pretrained`` (adapter weights only)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json"))


def load_adapter(path: str, *, dtype: torch.dtype, trainable: bool, base: PreTrainedModel | None = None) -> Any:
    """peft model from an adapter directory, on ``base`` or on the base model the adapter names."""
    peft = _peft()
    path = os.path.expanduser(path)
    if base is None:
        base_name = peft.PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base_name:
            raise ValueError(f"adapter {path!r} does not name its base model (base_model_name_or_path)")
        check_model_source(base_name)
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
    return peft.PeftModel.from_pretrained(base, path, is_trainable=trainable)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``--dtype`` on ``device`` (auto: bf16 on CUDA, fp32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(table)}")
    return table[dtype]


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ValueError("LoRA needs the 'peft' package: pip install 'ebpo[lora]' (or set --lora-rank 0)") from exc
    return peft


def add_lora(model: PreTrainedModel, rank: int, alpha: float = 16.0) -> Any:
    """Wrap ``model`` with LoRA adapters on every linear projection; only the adapters train."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


_resolve_dtype = resolve_dtype  # the name other modules imported before it was public
