"""Models: the built-in tiny Llama with a character tokenizer, and Hugging Face loading."""

from ebpo.models.loading import (
    TinyLlamaSpec,
    build_tiny_llama,
    check_model_source,
    load_policy,
    load_tokenizer,
    select_device,
)
from ebpo.models.tokenizer import DEFAULT_ALPHABET, CharTokenizer

__all__ = [
    "CharTokenizer",
    "DEFAULT_ALPHABET",
    "TinyLlamaSpec",
    "build_tiny_llama",
    "check_model_source",
    "load_policy",
    "load_tokenizer",
    "select_device",
]
