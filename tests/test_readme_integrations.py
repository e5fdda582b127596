"""The README's integration snippets run (not just parse)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def snippet(tag: str) -> str:
    match = re.search(rf"<!-- test: {tag} -->\s*```python\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no snippet tagged {tag}"
    return match.group(1)


def test_trl_snippet_trains(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama
    from ebpo.models.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    tokenizer.padding_side = "left"
    namespace = {
        "out": str(tmp_path),
        "model": build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0),
        "tokenizer": tokenizer,
        "reward": lambda completions, **_: [float(len(c) % 2) for c in completions],
        "dataset": datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(16)]),
    }
    exec(compile(snippet("trl"), "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    assert trainer.ebpo_estimator.state_dict()["estimator_state"]["group_stats"]["count"] == 2.0
