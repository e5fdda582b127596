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


def timeless(row: dict) -> dict:
    """A metrics row without its wall-clock fields (which differ between two runs of the same maths)."""
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def saved_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))
