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
