"""Data parallelism through accelerate on CPU: 2 processes (gloo) launched by torchrun, the launcher accelerate
uses for multi-process runs, reading the same environment.

Both runs train on one fixed global batch (see tests/train_dp_worker.py): greedy completions of the seeded
initial policy and synthetic rewards, so the only difference between 1 and 2 processes is how the batch is
sharded. Shards are uneven (ranks run different numbers of micro-batches, one rank may hold none), which
exercises the zero-weight padding passes that keep DDP's collectives in step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from tolerances import UPDATE_ULPS, assert_close_norm

WORKER = os.path.join(os.path.dirname(__file__), "train_dp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(out, shards: str, *flags: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    world = len(shards.split(","))
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(_free_port()),
        ]
        if world > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [*launcher, WORKER, str(out), shards, *flags], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize(
    "shards, flags",
    [("10,6", []), ("14,2", ["--lora-rank", "4"])],
    ids=["full-params", "lora"],
)
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, shards, flags):
    rank0, rank1 = _run(tmp_path / "two", shards, *flags)
    (single,) = _run(tmp_path / "one", "16", *flags)
    assert rank0["estimator"] == rank1["estimator"] == single["estimator"]  # bit-identical (gathered global batch)
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])  # ranks in lockstep
    start = _weights_at_start(flags)
    moved = _max_diff(single["params"], start)
    assert moved > 1e-3  # training moved the weights ...
    for name, value in single["params"].items():  # ... and sharding did not change where to (float rounding)
        assert_close_norm(rank0["params"][name] - start[name], value - start[name], ulps=UPDATE_ULPS, what=name)
    for two, one in zip(rank0["metrics"], single["metrics"]):  # logged metrics are the global ones
        for key in ("loss/policy", "loss/total", "loss/divergence", "policy/entropy", "optim/grad_norm", "optim/lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_a_rank_without_responses_keeps_the_collectives_in_step(tmp_path):
    """Dynamic sampling can leave a rank with nothing to train on; it still joins every backward and gather."""
    rank0, rank1 = _run(tmp_path / "two", "16,0")
    assert rank0["estimator"] == rank1["estimator"]
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])


def _weights_at_start(flags: list[str]) -> dict[str, torch.Tensor]:
    """The seeded initial policy (LoRA: adapters as initialised; lora_B is zero)."""
    from ebpo.models import load_policy

    model, _ = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
    if "--lora-rank" in flags:
        from ebpo.models.loading import add_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = add_lora(model, 4)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
