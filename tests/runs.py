"""Short ``ebpo train`` runs shared by the end-to-end test files (a module, like ``oracles.py``; fixtures are
in ``conftest.py``)."""

from __future__ import annotations

import os

import torch

# The small built-in task, a 40-step warm start, 4 prompts x 4 samples: seconds a step on one thread.
TINY = [
    "--task",
    "arithmetic",  # the small built-in task (the default is stepwise)
    "--warmstart-steps",
    "40",
    "--warmstart-batch-size",
    "32",
    # Copy-a-digit problems: learnable in a few warm-start steps, so rewards are mixed and the policy moves.
    "--task-options",
    "{num_train: 400, num_eval: 16, max_terms: 1, max_digits: 2}",
    "--prompts-per-step",
    "4",
    "--group-size",
    "4",
    "--max-new-tokens",
    "6",
    "--log-every",
    "1",
    "--no-progress",
    "--threads",
    "1",
]


# Smaller still (2 prompts x 2 samples, no evaluation samples): for tests that run many short runs (faults, files).
MINI = [
    "--task",
    "arithmetic",
    "--warmstart-steps",
    "20",
    "--warmstart-batch-size",
    "16",
    "--task-options",
    "{num_train: 64, num_eval: 8, max_terms: 1, max_digits: 1}",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--eval-samples",
    "0",
    "--no-progress",
    "--no-tensorboard",
    "--threads",
    "1",
]


def trl_args(out, **extra):
    """An ``EBPOGRPOConfig`` for the TRL tests: CPU, 8 rows of 4 generations, 4 tokens, running prior + HA-DW,
    nothing saved or reported; ``extra`` overrides any field."""
    from ebpo.integrations.trl import EBPOGRPOConfig

    options = dict(
        output_dir=str(out),
        max_steps=1,
        learning_rate=1e-3,
        beta=0.0,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        ebpo_estimator="ebpo",
        ebpo_estimator_options={"prior": "running"},
        ebpo_weighting="ha_dw",
    )
    return EBPOGRPOConfig(**{**options, **extra})


def timeless(row: dict) -> dict:
    """A metrics row without its wall-clock fields (which differ between two runs of the same maths)."""
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def saved_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def fake_generate(model, tokenizer, problems, global_ids, *, group_size, **_):
    """A stand-in for ``ebpo.sampling.generate``: ``group_size`` empty completions of each problem, no model."""
    from ebpo.sampling import Rollout

    rows = len(problems) * group_size
    return Rollout(
        input_ids=torch.zeros(rows, 4, dtype=torch.long),
        attention_mask=torch.ones(rows, 4, dtype=torch.long),
        completion_mask=torch.ones(rows, 3),
        prompt_length=1,
        group_ids=torch.as_tensor(global_ids).repeat_interleave(group_size),
        texts=["x"] * rows,
        problems=[p for p in problems for _ in range(group_size)],
    )


def torchrun(processes: int) -> list[str]:
    """The command prefix that launches ``processes`` CPU processes with torchrun on a free local port."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
    ]
