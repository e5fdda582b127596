"""Data parallelism through accelerate on CPU: 2 processes (gloo) launched by torchrun, the launcher accelerate
uses for multi-process runs, reading the same environment.

Both runs train on one fixed global batch (see tests/train_dp_worker.py): greedy completions of the seeded
initial policy and synthetic rewards, so the only difference between 1 and 2 processes is how the batch is
sharded. Shards are uneven (ranks run different numbers of micro-batches, one rank may hold none), which
exercises the zero-weight padding passes that keep DDP's collectives in step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from runs import TINY, saved_weights, timeless, torchrun
from tolerances import UPDATE_ULPS, assert_close_norm

WORKER = os.path.join(os.path.dirname(__file__), "train_dp_worker.py")


def _run(out, shards: str, *flags: str, fsdp: bool = False) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    world = len(shards.split(","))
    launcher = torchrun(world) if world > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if fsdp:  # tests/fsdp_cpu.py: the trainer under a real FSDP wrapper; the worker also saves a checkpoint
        env.update(EBPO_TEST_FSDP="1", EBPO_TEST_SAVE="1")
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


# ---------------------------------------------------------------- FSDP on CPU (tests/fsdp_cpu.py)
@pytest.mark.parametrize(
    "shards, flags",
    # full parameters: slow-marked (40 s); the LoRA run exercises every FSDP path but the whole-weight save,
    # which the slow end-to-end run below also checks
    [pytest.param("10,6", [], marks=pytest.mark.slow), ("14,2", ["--lora-rank", "4"])],
    ids=["full-params", "lora"],
)
def test_fsdp_two_processes_equal_one_process_and_its_checkpoint_holds_the_whole_weights(tmp_path, shards, flags):
    """A real FSDP wrapper (full sharding, decoder layers wrapped), 2 CPU processes over gloo, against one
    process on the same global batch. Two PPO epochs, so the old-policy pass runs (through the wrapper: the
    plain module's root parameters are shards there), with uneven shards (its idle forwards keep the
    ranks' gathers in step). The checkpoint the trainer writes holds the gathered weights, not a rank's
    shard views, and the optimiser state keyed by parameter name."""
    from transformers import AutoModelForCausalLM

    rank0, rank1 = _run(tmp_path / "fsdp", shards, *flags, fsdp=True)
    (single,) = _run(tmp_path / "one", "16", *flags)
    assert rank0["estimator"] == rank1["estimator"] == single["estimator"]
    assert rank0["params"].keys() == single["params"].keys()
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    start = _weights_at_start(flags)
    assert _max_diff(single["params"], start) > 1e-3
    for name, value in single["params"].items():
        assert_close_norm(rank0["params"][name] - start[name], value - start[name], ulps=UPDATE_ULPS, what=name)
    for two, one in zip(rank0["metrics"], single["metrics"]):  # the gradient norm is the global one (LoRA too)
        for key in ("loss/policy", "loss/divergence", "optim/grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key

    saved = tmp_path / "fsdp" / "checkpoints" / "step-000003"
    if flags:  # LoRA: the adapter, read back by peft onto the base it was trained on
        from ebpo.models import load_policy
        from ebpo.models.loading import load_adapter

        base, _ = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
        loaded = load_adapter(str(saved / "model"), dtype=torch.float32, trainable=False, base=base).state_dict()
        lora = [k for k in rank0["params"] if ".lora_" in k]
        assert lora and all(torch.equal(loaded[k], rank0["params"][k]) for k in lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(saved / "model"))
        assert all(torch.equal(model.state_dict()[k], rank0["params"][k]) for k in rank0["params"])
    state = torch.load(saved / "trainer_state.pt", weights_only=True)
    named = state["optimizer"]["state"]
    assert named and all(isinstance(key, str) and key in rank0["params"] for key in named)
    for key, moments in named.items():  # whole moments, not one rank's shard
        assert moments["exp_avg"].shape == rank0["params"][key].shape, key


FSDP_RUN = [
    *TINY,
    "--device",
    "cpu",  # (auto would leave accelerate without a process group on a machine without GPUs)
    "--task-options",
    "{num_train: 400, num_eval: 15, max_terms: 1, max_digits: 2}",  # 15 held-out problems: 8 and 7 per rank
    "--prompts-per-step",
    "3",  # 2 and 1 prompts per rank: unequal generate calls and lengths
    "--ppo-epochs",
    "2",
    "--lora-rank",
    "0",
    "--steps",
    "3",
    "--save-every",
    "2",
    "--keep-checkpoints",
    "5",
    "--estimator-options",
    "{prior: running}",
]


def _fsdp_train(*args: str) -> None:
    launcher = torchrun(2)
    script = os.path.join(os.path.dirname(__file__), "fsdp_cpu.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([*launcher, script, "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # two 2-process runs, about 2 minutes; the default suite has the worker runs and the sync unit test
def test_fsdp_train_samples_evaluates_saves_and_resumes_to_the_uninterrupted_run(tmp_path):
    """``ebpo train`` end to end under FSDP on 2 CPU processes: sampling and evaluation with ranks holding
    different numbers of prompts (every model call gathers shards, so both ranks make the same calls),
    the EBPO preset's KL reference, checkpoints, and a resume from step 2 that reproduces step 3."""
    import shutil

    from ebpo.train.tracking import read_metrics

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _fsdp_train("--out", str(full), *FSDP_RUN)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    _fsdp_train("--resume", str(resumed), "--no-progress")
    rows = [[timeless(r) for r in read_metrics(str(run / "metrics.jsonl"))] for run in (full, resumed)]
    assert rows[0] == rows[1]
    assert [r["step"] for r in rows[0] if "reward/mean" in r] == [1, 2, 3]
    weights = [saved_weights(str(run / "checkpoints" / "step-000003" / "model")) for run in (full, resumed)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_optimizer_state_is_saved_by_name_and_older_checkpoints_keyed_by_position_still_load():
    """Checkpoints hold the optimiser state keyed by parameter name (the layout FSDP can reshard); a
    checkpoint written before, keyed by position, loads as before, and FSDP refuses it by name."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ebpo.train.distributed import Dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)  # as a resumed trainer's model is
    dist = Dist()
    named = dist.optimizer_state_dict(model, optimizer)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for state in (named, optimizer.state_dict()):
        fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
        dist.load_optimizer_state_dict(model, fresh, state)
        for p in model.parameters():
            assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
            assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])
    fsdp = Dist(accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="keyed by position"):
        fsdp.load_optimizer_state_dict(model, torch.optim.AdamW(model.parameters()), optimizer.state_dict())
