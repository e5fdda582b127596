"""``ebpo train --lora-rank``: only the adapters train, the reference is the policy with adapters off,
checkpoints hold the adapter, and resume and ``ebpo eval`` load it back."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("peft")

from ebpo.cli import main  # noqa: E402
from ebpo.train.tracking import read_metrics  # noqa: E402

from test_train_cli import TINY, _cache, _timeless, _weights  # noqa: E402,F401  (the fixture keeps ~/.cache clean)

LORA = ["--method", "ebpo", "--lora-rank", "4", "--lr", "3e-3", "--seed", "2", "--steps", "4", "--save-every", "2", "--keep-checkpoints", "5", *TINY]


def test_lora_run_trains_adapters_only_and_resumes(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", "--out", str(full), *LORA]) == 0
    final = full / "checkpoints" / "step-000004" / "model"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert not (final / "model.safetensors").exists()  # the adapter only
    state = torch.load(full / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert adapter["base_model_name_or_path"] == state["init_model"]
    assert any(abs(w).sum() > 0 for k, w in _adapter(final).items() if "lora_B" in k)  # B starts at 0: it moved

    rows = [r for r in read_metrics(str(full / "metrics.jsonl")) if "loss/divergence" in r]
    assert rows[0]["loss/divergence"] == 0.0  # step 1: LoRA B = 0, so policy == reference (adapters off)
    assert rows[-1]["loss/divergence"] > 0.0  # the reference stays put while the adapters move

    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert [_timeless(r) for r in read_metrics(str(resumed / "metrics.jsonl"))] == [_timeless(r) for r in read_metrics(str(full / "metrics.jsonl"))]

    out = tmp_path / "eval"
    task = TINY[TINY.index("--task-options") + 1]
    assert main(["eval", "--model", str(full), "--task-options", task, "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    summary = json.loads((full / "summary.json").read_text())
    assert report["results"]["arithmetic"]["avg@4"] == pytest.approx(summary["accuracy_after"])  # the merged adapter, evaluated


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))
