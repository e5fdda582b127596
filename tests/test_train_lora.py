"""``ebpo train --lora-rank``: only the adapters train, the reference is the policy with adapters off,
checkpoints hold the adapter, and resume and ``ebpo eval`` load it back."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("peft")

from runs import TINY  # noqa: E402
from runs import timeless as _timeless  # noqa: E402
from tolerances import LOGPROB_ULPS, assert_close_scale  # noqa: E402

from ebpo.cli import main  # noqa: E402
from ebpo.train.tracking import read_metrics  # noqa: E402

LORA = [
    "--method",
    "ebpo",
    "--lora-rank",
    "4",
    "--lr",
    "3e-3",
    "--seed",
    "2",
    "--steps",
    "4",
    "--save-every",
    "2",
    "--keep-checkpoints",
    "5",
    *TINY,
]


def test_lora_run_trains_adapters_only_and_resumes(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", "--out", str(full), *LORA]) == 0
    final = full / "checkpoints" / "step-000004" / "model"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert not (final / "model.safetensors").exists()  # the adapter only
    state = torch.load(full / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
    assert adapter["base_model_name_or_path"] == state["init_model"]
    assert any(abs(w).sum() > 0 for k, w in _adapter(final).items() if "lora_B" in k)  # B starts at 0: it moved

    rows = [r for r in read_metrics(str(full / "metrics.jsonl")) if "loss/divergence" in r]
    assert rows[0]["loss/divergence"] == 0.0  # step 1: LoRA B = 0, so policy == reference (adapters off)
    assert rows[-1]["loss/divergence"] > 0.0  # the reference stays put while the adapters move

    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert [_timeless(r) for r in read_metrics(str(resumed / "metrics.jsonl"))] == [
        _timeless(r) for r in read_metrics(str(full / "metrics.jsonl"))
    ]

    out = tmp_path / "eval"
    task = TINY[TINY.index("--task-options") + 1]
    assert main(["eval", "--model", str(full), "--task-options", task, "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    summary = json.loads((full / "summary.json").read_text())
    assert report["results"]["arithmetic"]["avg@4"] == pytest.approx(
        summary["accuracy_after"]
    )  # the merged adapter, evaluated


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_lora_old_logprobs_keep_the_adapters_and_reference_ones_drop_them(tmp_path, monkeypatch):
    """With LoRA the reference is the policy object itself: only the reference pass may disable the adapters."""
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.rollout import rows_logprobs
    from ebpo.train.trainer import Trainer, build_components

    config = resolve_config(build_parser().parse_args([*LORA, "--mini-batches", "2"]))
    trainer = Trainer(config, str(tmp_path / "run"), build_components(config), resume=False, echo=lambda _: None)
    assert trainer.ref_model is trainer.model
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # the adapters now change the policy
    rollout, _, _, _ = trainer.rollout_and_score()
    rows = torch.arange(rollout.input_ids.shape[0])
    with torch.no_grad():
        with_adapters = rows_logprobs(trainer.model, rollout, rows)
        with trainer.model.disable_adapter():
            base = rows_logprobs(trainer.model, rollout, rows)
    mask = rollout.completion_mask.bool()
    assert not torch.allclose(with_adapters[mask], base[mask], atol=1e-4)
    old = trainer._logprobs(trainer.model, rollout, rows)[mask]
    assert_close_scale(old, with_adapters[mask], ulps=LOGPROB_ULPS, what="old log-probs")
    reference = trainer._logprobs(trainer.ref_model, rollout, rows, reference=True)[mask]
    assert_close_scale(reference, base[mask], ulps=LOGPROB_ULPS, what="reference log-probs")
