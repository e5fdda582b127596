"""One rank of a data-parallel ``Trainer`` on a fixed rollout (launched by tests/test_train_accelerate.py).

    python -m accelerate.commands.launch --cpu --num_processes 2 tests/train_dp_worker.py OUT SHARD_SIZES [flags]
    python tests/train_dp_worker.py OUT 16 [flags]                      # the same global batch in one process
    EBPO_TEST_FSDP=1 python -m torch.distributed.run --nproc_per_node 2 tests/train_dp_worker.py OUT 10,6   # FSDP

Every rank builds the same global rollout (greedy completions of the first 4
training prompts under the seeded initial policy, so no sampling randomness
differs between runs) and synthetic, step-dependent rewards; rank r trains on
its contiguous slice of SHARD_SIZES (e.g. "10,6": uneven shards). The update,
the estimator and the optimiser are the trainer's own, so a 2-process run must
reproduce the 1-process run on the same global batch up to float rounding.
Writes OUT/rank{r}.pt: estimator state, parameters and each step's metrics. Under FSDP
(``EBPO_TEST_FSDP=1``, tests/fsdp_cpu.py) the parameters are the gathered whole ones, and the trainer's
own checkpoint of the last step is written to OUT (``EBPO_TEST_SAVE=1``).
"""

from __future__ import annotations

import os
import sys

import torch

from ebpo.sampling import generate
from ebpo.train.cli import build_parser, resolve_config
from ebpo.train.trainer import Trainer, build_components

FLAGS = [
    "--task",
    "arithmetic",
    "--warmstart-steps",
    "0",
    "--task-options",
    "{num_train: 64, num_eval: 8, max_terms: 1, max_digits: 2}",
    "--prompts-per-step",
    "4",
    "--group-size",
    "4",
    "--max-new-tokens",
    "6",
    "--no-progress",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--no-tensorboard",
    "--micro-batch-size",
    "2",
    "--ppo-epochs",
    "2",
    "--lr",
    "1e-3",
    "--lr-warmup-steps",
    "0",
    "--estimator-options",
    "{prior: running}",
]
STEPS = 3


def main() -> None:
    out, sizes, extra = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3:]
    if os.environ.get("EBPO_TEST_FSDP") == "1":
        sys.path.insert(0, os.path.dirname(__file__))
        import fsdp_cpu

        fsdp_cpu.enable()
    config = resolve_config(build_parser().parse_args(["--out", out, *FLAGS, *extra]))
    trainer = Trainer(config, out, build_components(config), resume=False, echo=lambda _: None)
    rank, world = trainer.dist.rank, trainer.dist.world
    assert world == len(sizes), (world, sizes)
    problems = trainer.c.task.train_problems()[:4]
    with trainer._generation_context():  # (FSDP: the root's parameters gathered)
        rollout = generate(
            trainer.model,
            trainer.tokenizer,
            problems,
            torch.arange(4),
            group_size=4,
            max_new_tokens=6,
            temperature=1.0,
            top_p=1.0,
            do_sample=False,
            chat_template="auto",
            batch_size=0,
            sync=trainer.dist.sync_calls,
        )
    start = sum(sizes[:rank])
    rows = torch.arange(start, start + sizes[rank])
    history = []
    for step in range(STEPS):
        rewards = torch.tensor([float((i * 7 + step * 3) % 5 < 2) for i in range(16)], dtype=torch.float64)  # (16,)
        mine = rollout.select(rows)
        advantages, adv_metrics = trainer.compute_advantages(mine, rewards[rows], rewards[rows])
        metrics = trainer.update(mine, advantages)
        trainer.step += 1
        history.append({**adv_metrics, **metrics})
    if os.environ.get("EBPO_TEST_SAVE") == "1":
        trainer.save()
    params = trainer.dist.full_state_dict(trainer.train_model) or trainer.model.state_dict()
    torch.save(
        {
            "estimator": trainer.c.estimator.state_dict(),
            "params": {k: v.detach().clone() for k, v in params.items()},
            "metrics": history,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
