"""``ebpo train`` end to end on tiny settings: artifacts, learning signal, resume, bad configuration, 2 processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ebpo.losses", reason="the policy losses module is not installed yet")
pytest.importorskip("ebpo.divergences", reason="the divergences module is not installed yet")

from runs import TINY  # noqa: E402
from runs import saved_weights as _weights  # noqa: E402
from runs import timeless as _timeless  # noqa: E402

from ebpo.cli import main  # noqa: E402
from ebpo.train.tracking import read_metrics  # noqa: E402


def test_short_default_run_learns_and_writes_every_artifact(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--out", str(out), *TINY]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "learning_curve.png"):
        assert (out / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    final = out / "checkpoints" / "step-000003"
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "model/char_vocab.json",
        "trainer_state.pt",
        "rng-rank0.pt",
    ):
        assert (final / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "wall_seconds", "peak_rss_mb"):
        assert math.isfinite(summary[key])
    assert 0 < summary["peak_rss_mb"] < 4096
    # the warm start it began from, named by its weights (another machine trains a different one)
    weights = Path(summary["start"]["model"]) / "model.safetensors"
    assert summary["start"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), (row["step"], key)
    assert {"ebpo/shrinkage", "loss/policy", "optim/grad_norm", "train/accuracy"} <= set(rows[0])
    # Parameters moved away from the warm start the run began from.
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    start, end = _weights(state["init_model"]), _weights(str(final / "model"))
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert state["estimator"]["estimator"] == "ebpo"


def test_existing_run_dir_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", "--steps", "1", "--out", str(out), *TINY]) == 2
    assert "already exists, is not empty and was not created by ebpo" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 2 of 4; resuming from it gives the same step 3-4 metrics and estimator state."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [
        "--steps",
        "4",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "5",
        "--estimator-options",
        "{prior: running}",
        "--seed",
        "3",
        *TINY,
    ]
    assert main(["train", "--out", str(full), *args]) == 0
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")  # as if killed after the step-2 checkpoint
    state_at_2 = torch.load(resumed / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state_at_2["estimator"]["estimator_state"]["group_stats"]["count"] > 0  # a non-trivial prior to restore
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    rows_full = [_timeless(r) for r in read_metrics(str(full / "metrics.jsonl"))]
    rows_resumed = [_timeless(r) for r in read_metrics(str(resumed / "metrics.jsonl"))]
    assert rows_resumed == rows_full
    assert [r["step"] for r in rows_full if "reward/mean" in r] == [1, 2, 3, 4]
    end_full = torch.load(full / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
    end_resumed = torch.load(resumed / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
    assert end_full["estimator"] == end_resumed["estimator"]
    assert end_full["stream"] == end_resumed["stream"]
    a, b = (
        _weights(str(full / "checkpoints" / "step-000004" / "model")),
        _weights(str(resumed / "checkpoints" / "step-000004" / "model")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path):
    """A real kill: SIGKILL the training process right after its step-2 checkpoint appears, then --resume."""
    import signal
    import subprocess
    import sys
    import time

    full, killed = tmp_path / "full", tmp_path / "killed"
    args = [
        "--steps",
        "6",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "10",
        "--estimator-options",
        "{prior: running}",
        "--seed",
        "5",
        *TINY,
    ]
    assert main(["train", "--out", str(full), *args]) == 0  # also fills the warm-start cache the child reuses
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpo", "train", "--out", str(killed), *args],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = killed / "checkpoints" / "step-000002" / "trainer_state.pt"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no step-2 checkpoint within 240 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # it died mid-run
    assert not (killed / "checkpoints" / "step-000006").exists()

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    rows_full = [_timeless(r) for r in read_metrics(str(full / "metrics.jsonl"))]
    rows_resumed = [_timeless(r) for r in read_metrics(str(killed / "metrics.jsonl"))]
    assert rows_resumed == rows_full  # the steps after the kill, recomputed, equal the uninterrupted run's
    end_full = torch.load(full / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=True)
    end_resumed = torch.load(killed / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=True)
    assert end_full["estimator"] == end_resumed["estimator"]  # the estimator state was restored, then moved alike
    assert end_full["estimator"]["estimator_state"]["group_stats"]["count"] > 0
    assert not [p for p in os.listdir(killed / "checkpoints") if p.endswith(".tmp")]  # no half-written checkpoint left


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--estimator", "ebp"], "unknown advantage estimator 'ebp'"),
        (["--method", "grpo", "--group-size", "1"], "needs group_size >= 2, got 1; raise --group-size"),
        (["--divergence", "kl", "--ref-model", "none"], "needs a reference policy but ref_model is 'none'"),
        (["--model", "/no/such/model/dir"], "model path '/no/such/model/dir' is not a directory"),
        (["--curriculum", "alphabetical"], "unknown curriculum 'alphabetical'"),
        (["--div-coef", "0.1", "--divergence", "none"], "no divergence is set; pass --divergence"),
        (["--estimator-options", "{prior: sometimes}"], "prior must be one of"),
        (["--method", "gbmpo-probl2", "--mirror-params", "m.json"], "mirror_params needs --divergence neural_mirror"),
        (
            ["--method", "gbmpo-mirror", "--mirror-params", "/no/such/mirror.json"],
            "cannot read neural_mirror parameters from '/no/such/mirror.json'",
        ),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebpo train: error:") and message in err, err
    assert not out.exists()  # nothing was started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DP_FLAGS = ["--estimator-options", "{prior: running}", "--weighting", "ha_dw"]


def _worker(rank: int, world: int, port: int, out: str, cache: str, flags: list[str] = DP_FLAGS) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "EBPO_CACHE_DIR": cache,
        }
    )
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.trainer import Trainer, build_components

    args = build_parser().parse_args(
        [
            "--steps",
            "3",
            "--out",
            out,
            *flags,
            "--device",
            "cpu",
            *TINY,
        ]
    )
    config = resolve_config(args)
    components = build_components(config)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    trainer = Trainer(config, out, components, resume=False, echo=lambda _: None)
    trainer.train()
    torch.save(
        {
            "estimator": components.estimator.state_dict(),
            "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def _two_process_run(tmp_path, flags: list[str]) -> tuple[dict, dict]:
    out = str(tmp_path / "ddp")
    spawn_args = (2, _free_port(), out, str(tmp_path / "cache"), flags)
    torch.multiprocessing.spawn(_worker, args=spawn_args, nprocs=2, join=True)
    rank0, rank1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    return rank0, rank1


def test_two_process_gloo_run_has_identical_estimator_state(tmp_path):
    rank0, rank1 = _two_process_run(tmp_path, DP_FLAGS)
    assert rank0["estimator"] == rank1["estimator"]  # bit-identical floats, lists and tensors
    assert rank0["estimator"]["estimator_state"]["group_stats"]["count"] == 3 * 4  # 3 steps x 4 global prompts


@pytest.mark.slow  # 2 process launches, about 25 s each; the default suite has the simulated-rank tests
@pytest.mark.parametrize(
    "flags", [["--estimator", "spo"], ["--estimator", "krpo", "--estimator-options", "{carry: true}"]]
)
def test_two_process_gloo_run_keeps_the_per_prompt_trackers_identical(tmp_path, flags):
    """spo's and krpo's per-prompt state is built from the gathered global batch: both ranks hold every prompt's."""
    rank0, rank1 = _two_process_run(tmp_path, flags)
    state0, state1 = rank0["estimator"]["estimator_state"], rank1["estimator"]["estimator_state"]
    assert state0.keys() == state1.keys()
    for key in state0:
        a, b = state0[key], state1[key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert state0["keys"].numel() == 3 * 4  # every global prompt (3 steps x 4), not only this rank's 2 a step


@pytest.mark.parametrize(
    "method",
    [
        "grpo",
        "dr_grpo",
        "dapo",
        "rloo",
        "entropymech",
        "ebpo-topic",
        "ebpo-diff",
        "ha_dw",
        "ebpo+ha_dw",
        "gbmpo-probl2",
        "gbmpo-mirror",
    ],
)
def test_every_preset_trains(tmp_path, method):
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--steps", "2", "--out", str(out), "--no-tensorboard", *TINY]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert all(math.isfinite(v) for row in rows for v in row.values())
    if method == "dapo":
        assert all(1 <= r["dapo/rounds"] <= 4 for r in rows if "dapo/rounds" in r)


def test_ppo_minibatches_and_gradient_accumulation_run(tmp_path):
    out = tmp_path / "run"
    flags = ["--ppo-epochs", "2", "--mini-batches", "2", "--micro-batch-size", "3", "--lr-schedule", "cosine"]
    assert main(["train", "--steps", "2", "--out", str(out), "--no-tensorboard", *TINY, *flags]) == 0
    rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss/approx_kl" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss/approx_kl"]) for r in rows)


@pytest.mark.slow
def test_full_default_run_improves_held_out_accuracy(tmp_path, monkeypatch):
    """The README command, `ebpo train` with no options (fresh warm start): <= 5 min, <= 2 GB, accuracy up."""
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert summary["wall_seconds"] < 300 and summary["peak_rss_mb"] < 2048


def test_the_default_task_is_stepwise_with_its_recommendations(tmp_path):
    """`ebpo train` with no --task runs the stepwise testbed under its recommended settings (shortened here)."""
    out = tmp_path / "run"
    short = [
        "--steps",
        "1",
        "--warmstart-steps",
        "5",
        "--warmstart-batch-size",
        "8",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--task-options",
        "{num_train: 40, num_eval: 10}",
        "--eval-samples",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--threads",
        "1",
        "--save-every",
        "0",
    ]
    assert main(["train", "--out", str(out), *short]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"] == "stepwise" and config["method"] == "ebpo" and config["group_size"] == 2
    assert (
        config["max_new_tokens"] == 44 and config["lr"] == 3e-4 and config["warmstart_lr"] == 3e-3
    )  # the task's recommendations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "stepwise" and set(summary["accuracy_by_topic"]) <= {
        "add1",
        "chain4",
        "mul1",
        "chain5",
        "add2",
    }
    assert sum(row["problems"] for row in summary["accuracy_by_topic"].values()) == 10
