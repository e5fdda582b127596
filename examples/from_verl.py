"""From verl: pick ebpo's estimators and divergences by name in a verl config, through verl's own code.

    pip install "verl==0.9.1" && pip install -e .      # in your verl environment, from a clone of ebpo
    export VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin
    python examples/from_verl.py                                   # the overrides below
    python examples/from_verl.py algorithm.adv_estimator=ebpo_hier # any verl override, as on verl's command line

A real run is verl's own launcher with the same overrides (`python -m verl.trainer.main_ppo ...
algorithm.adv_estimator=ebpo_running ...`). This script does what verl's driver does, without Ray or a GPU:
it composes verl's `ppo_trainer` config with the overrides, then makes the driver's advantage call
(`verl.trainer.ppo.ray_trainer.compute_advantage`) on a small batch and the actor's KL-loss call
(`core_algos.kl_penalty`) on made-up log-probabilities. The names the plugin registers:

    algorithm.adv_estimator             ebpo, ebpo_running, ebpo_ema, ebpo_hier, ebpo_hier_running, ha_dw, ebpo_ha_dw
    actor_rollout_ref.actor.kl_loss_type  ebpo:prob_l2, ebpo:log_l2, ebpo:kl_k1 / _k2 / _k3, ebpo:neural_mirror[=PATH]

Each name fixes the estimator; `+algorithm.ebpo.*` sets its other options (`+` because verl's config does not
declare the key), e.g. `+algorithm.ebpo.estimator_options.decay=0.95` (ebpo_ema),
`+algorithm.ebpo.weighting_options.lam=1.5` (HA-DW). The hierarchical prior (`ebpo_hier*`) reads each sample's
topic from `data_source` (verl's dataset-name field; `+algorithm.ebpo.topic_key=COLUMN` names another). HA-DW
(`ha_dw`, `ebpo_ha_dw`) weights by correctness, a success in [0, 1]: each response's `acc` from the reward extra
info (a reward function returning `{"score": s, "acc": 0 or 1}`), or `+algorithm.ebpo.correctness_threshold=T`
(correct when the score is >= T). More: the README's verl section and `ebpo.integrations.verl`.
"""

from __future__ import annotations

import os
import sys

# Your launch command exports this; verl imports the plugin when it is imported, in every process it starts.
os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "ebpo.integrations.verl_plugin")

try:
    import verl
except ImportError:
    sys.exit('this example needs verl: pip install "verl==0.9.1" (scripts/test-verl.sh builds such an environment)')

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage

from ebpo.integrations.verl import SPECS, TOPIC_KEY

OVERRIDES = [  # what you would pass to python -m verl.trainer.main_ppo
    "algorithm.adv_estimator=ebpo_running",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.use_kl_loss=True",
    "actor_rollout_ref.actor.kl_loss_coef=0.1",
    "actor_rollout_ref.actor.kl_loss_type=ebpo:prob_l2",
]


def load_config(overrides: list[str]):
    """verl's own trainer config (verl/trainer/config/ppo_trainer.yaml) with command-line overrides, as hydra builds it."""
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def rollout_batch(n: int) -> DataProto:
    """Three prompts x n responses, a 0/1 score on each response's last token, as verl's reward step leaves them.

    The non-tensor fields are the ones verl's (legacy) trainer carries: the prompt's uid and dataset field
    ``data_source``, the dataset's ``index`` (copied from each row's ``extra_info["index"]``: the prompt's key across
    steps, which ``spo`` and ``krpo_carry`` read; the uid is drawn afresh every step), and the reward function's
    extra info (``acc``: a reward function that returns ``{"score": s, "acc": 0 or 1}``).
    """
    scores = torch.tensor([[0.0] * n, [1.0, 0.0] * (n // 2), [1.0] * n]).reshape(-1)  # all fail, mixed, all pass
    bs, length = scores.numel(), 5
    lengths = torch.arange(bs) % length + 1  # (bs,) response lengths 1..5
    response_mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # (bs, length)
    token_level_rewards = torch.zeros(bs, length)
    token_level_rewards[torch.arange(bs), lengths - 1] = scores
    return DataProto.from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": response_mask},
        non_tensors={
            "uid": np.array([f"prompt-{i // n}" for i in range(bs)], dtype=object),  # verl's group id
            TOPIC_KEY: np.array(["gsm8k"] * (2 * n) + ["math"] * n, dtype=object),  # the topic of each sample
            "index": np.array([i // n for i in range(bs)], dtype=object),  # the dataset row: the prompt's key
            "acc": scores.numpy(),  # HA-DW's correctness, from the reward function's extra info
        },
    )


def advantages(config, estimator: str, n: int) -> torch.Tensor:
    """The driver's call (verl's RayPPOTrainer.fit makes the same one); one advantage per response (bs,)."""
    batch = compute_advantage(
        rollout_batch(n),
        adv_estimator=estimator,
        num_repeat=n,
        norm_adv_by_std_in_grpo=config.algorithm.norm_adv_by_std_in_grpo,
        config=config.algorithm,
    )
    return batch.batch["advantages"][:, 0]  # every response's first token carries its advantage


def main() -> None:
    config = load_config(OVERRIDES + sys.argv[1:])
    estimator = config.algorithm.adv_estimator
    n = config.actor_rollout_ref.rollout.n
    actor = config.actor_rollout_ref.actor
    registered = sorted(name for name in SPECS if name in core_algos.ADV_ESTIMATOR_REGISTRY)
    print(f"verl {verl.__version__}; ebpo estimators registered in verl: {', '.join(registered)}")
    print(
        f"config: adv_estimator={estimator}, rollout.n={n}, kl_loss_type={actor.kl_loss_type}, "
        f"kl_loss_coef={actor.kl_loss_coef}, loss_agg_mode={actor.loss_agg_mode}"
    )
    if config.algorithm.get("ebpo") is not None:
        print(f"ebpo options (+algorithm.ebpo): {OmegaConf.to_container(config.algorithm.ebpo)}")
    if registered != sorted(SPECS):
        sys.exit(
            f"the plugin did not register {sorted(set(SPECS) - set(registered))}: is VERL_USE_EXTERNAL_MODULES set?"
        )

    adv = advantages(config, estimator, n)
    print(f"{estimator} advantages, one row per prompt (all fail / mixed / all pass):")
    for row in adv.reshape(-1, n).tolist():
        print("   ", " ".join(f"{a:+.3f}" for a in row))
    if estimator.startswith("ebpo") and not (adv[:n].lt(0).all() and adv[-n:].gt(0).all()):
        sys.exit("EBPO should push the all-fail group down and the all-pass group up")

    # The actor's KL-loss term: verl calls core_algos.kl_penalty(logprob, ref_logprob, kl_loss_type) per token
    # and aggregates it with loss_agg_mode, weighted by kl_loss_coef; ebpo:... names reach ebpo's divergences.
    logprob = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))  # (bs, T) current policy
    ref_logprob = torch.log(torch.tensor([[0.4, 0.9, 0.3]]))  # (bs, T) reference policy
    penalty = core_algos.kl_penalty(logprob, ref_logprob, actor.kl_loss_type)  # (bs, T)
    print(f"{actor.kl_loss_type} per token: {[round(v, 4) for v in penalty[0].tolist()]}")

    print("every name, same batch, default options (first response of each prompt):")
    defaults = load_config(OVERRIDES)  # your +algorithm.ebpo options may not apply to every name
    for name in registered:
        first = advantages(defaults, name, n).reshape(-1, n)[:, 0]
        print(f"    {name:<18} " + " ".join(f"{a:+.3f}" for a in first.tolist()))
    print("ok")


if __name__ == "__main__":
    main()
