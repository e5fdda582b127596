"""Oracle: stock TRL. ``EBPOGRPOTrainer`` with ``ebpo_estimator="grpo"`` and ``ebpo_divergence="kl"`` (k3) must
train exactly like TRL's own ``GRPOTrainer`` with its k3 KL term, wherever TRL users train: every loss type the
divergence supports, ``steps_per_generation`` equal to and different from gradient accumulation, 1 and 2 processes.

The default suite runs a representative subset (every loss type once, ``dapo`` where steps_per_generation and
accumulation differ in both directions, 2 processes in ``test_integration_trl.py``'s torchrun); ``pytest -m slow``
runs the whole grid, 4 loss types x steps_per_generation (1, 4) x accumulation (1, 2) x (1, 2) processes, and
prints its table.
"""

from __future__ import annotations

import itertools
import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from trl_ddp_worker import check_equivalence, equivalence_run, equivalence_table, run_two_processes  # noqa: E402

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
GRID = [(loss, spg, ga) for loss, spg, ga in itertools.product(LOSS_TYPES, (1, 4), (1, 2))]
FAST = [("dapo", 4, 1), ("dapo", 1, 2), ("grpo", 4, 2), ("bnpo", 1, 1), ("dr_grpo", 4, 2)]


@pytest.fixture(autouse=True)
def _no_trackers(monkeypatch):
    monkeypatch.setenv("WANDB_DISABLED", "true")


@pytest.mark.parametrize(("loss_type", "steps_per_generation", "accumulation"), FAST)
def test_grpo_estimator_and_kl_divergence_train_exactly_like_stock_trl(
    loss_type, steps_per_generation, accumulation, tmp_path
):
    result = equivalence_run(tmp_path, loss_type, steps_per_generation, accumulation)
    print(equivalence_table([result]))
    check_equivalence(result)


@pytest.mark.slow
def test_the_whole_grid_on_one_and_two_processes(tmp_path):
    results = [equivalence_run(tmp_path / "one", *config) for config in GRID]
    result = run_two_processes(tmp_path / "two", GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    results += json.loads((tmp_path / "two" / "equivalence.json").read_text())
    print("\n" + equivalence_table(results))
    for row in results:
        check_equivalence(row)
