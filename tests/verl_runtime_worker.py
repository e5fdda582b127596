"""Run under a real verl with VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin (see test_integration_verl_runtime.py).

Calls verl's own driver and worker code with ebpo plugged in and prints a JSON report; the test asserts on it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import verl  # noqa: F401  (imports the external modules: our plugin registers and installs here)
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.utils import losses
from verl.workers.utils.padding import no_padding_2_padding

from ebpo import build_estimator
from ebpo.divergences import NeuralMirror, build_divergence


def advantages_through_verls_driver() -> float:
    """verl's compute_advantage (the driver's call) with ebpo_running over 3 steps vs ebpo's core; max |diff|."""
    reference = build_estimator("ebpo", prior="running")
    worst = 0.0
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        bs, length = 12, 6
        lengths = torch.randint(1, length + 1, (bs,), generator=gen)
        mask = (torch.arange(length)[None] < lengths[:, None]).float()
        scores = (torch.rand(bs, generator=gen) < 0.4).float()
        token_rewards = torch.zeros(bs, length)
        token_rewards[torch.arange(bs), lengths - 1] = scores
        uids = np.array([f"u{i // 4}" for i in range(bs)], dtype=object)
        data = DataProto.from_dict(
            tensors={
                "token_level_rewards": token_rewards,
                "response_mask": mask,
                "responses": torch.zeros(bs, length, dtype=torch.long),
            },
            non_tensors={"uid": uids},
        )
        out = compute_advantage(data, adv_estimator="ebpo_running", num_repeat=4)
        expected, _ = reference(scores.double(), torch.arange(bs) // 4)
        worst = max(worst, float((out.batch["advantages"] - expected.float()[:, None] * mask).abs().max()))
    return worst


COEF = 0.3


def actor_loss(kl_loss_type: str, use_kl_loss: bool = True) -> tuple[float, torch.Tensor, float | None, dict]:
    """verl's engine-worker ppo_loss on a fixed batch: loss, d loss / d log_probs, the logged kl_loss, the batch."""
    cfg = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=4,
        use_kl_loss=use_kl_loss,
        kl_loss_coef=COEF,
        kl_loss_type=kl_loss_type,
        ppo_micro_batch_size_per_gpu=4,
        ppo_mini_batch_size=4,
        loss_agg_mode="token-mean",
    )
    gen = torch.Generator().manual_seed(0)
    bs, prompt, response = 4, 3, 5
    response_mask = (torch.arange(response)[None] < torch.tensor([5, 3, 4, 1])[:, None]).long()
    attention_mask = torch.cat([torch.ones(bs, prompt, dtype=torch.long), response_mask], 1)
    log_probs = (-2 * torch.rand(int(attention_mask.sum()), generator=gen, dtype=torch.float64)).requires_grad_()
    data = TensorDict(
        {
            "prompts": torch.randint(1, 50, (bs, prompt), generator=gen),
            "responses": torch.randint(1, 50, (bs, response), generator=gen),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "old_log_probs": -2 * torch.rand(bs, response, generator=gen, dtype=torch.float64),
            "advantages": torch.randn(bs, response, generator=gen, dtype=torch.float64),
            "ref_log_prob": -2 * torch.rand(bs, response, generator=gen, dtype=torch.float64),
        },
        batch_size=[bs],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    loss, metrics = losses.ppo_loss(cfg, {"log_probs": log_probs}, data)
    loss.backward()
    kl = metrics.get("kl_loss")
    response_logps = no_padding_2_padding(log_probs.detach(), data)  # (bs, response): verl's own slicing
    batch = {"logps": response_logps, "ref": data["ref_log_prob"], "mask": response_mask.double()}
    return (
        float(loss),
        log_probs.grad.clone(),
        (float(torch.as_tensor(kl.values).detach().sum()) if kl is not None else None),
        batch,
    )


def token_mean(name: str, batch: dict, **options: object) -> float:
    """The expected aggregated term, by hand: token mean of ebpo's divergence over the response mask."""
    d = build_divergence(name, **options)(batch["logps"], batch["ref"])
    return float((d * batch["mask"]).sum() / batch["mask"].sum())


def main(out_path: str, mirror_path: str) -> None:
    report: dict = {"registered": sorted(k for k in core_algos.ADV_ESTIMATOR_REGISTRY if "ebpo" in k or "ha_dw" in k)}
    report["losses_module_sees_wrapper"] = hasattr(losses.kl_penalty, "_ebpo_wrapped")
    report["advantage_max_abs_diff"] = advantages_through_verls_driver()

    verl_k3, verl_k3_grad, verl_k3_kl, _ = actor_loss("low_var_kl")
    ours_k3, ours_k3_grad, ours_k3_kl, _ = actor_loss("ebpo:kl_k3")
    report["k3_loss"] = [verl_k3, ours_k3]
    report["k3_kl_logged"] = [verl_k3_kl, ours_k3_kl]
    report["k3_grad_max_abs_diff"] = float((verl_k3_grad - ours_k3_grad).abs().max())

    base, base_grad, _, batch = actor_loss("low_var_kl", use_kl_loss=False)
    l2, l2_grad, l2_logged, _ = actor_loss("ebpo:prob_l2")
    # [loss - loss without the term, coef x the term by hand, logged kl_loss, the term by hand]
    report["prob_l2"] = [l2 - base, COEF * token_mean("prob_l2", batch), l2_logged, token_mean("prob_l2", batch)]
    report["prob_l2_changes_grad"] = float((l2_grad - base_grad).abs().max())
    NeuralMirror(
        torch.rand(NeuralMirror.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ).save(mirror_path)
    mirror, _, mirror_logged, _ = actor_loss(f"ebpo:neural_mirror={mirror_path}")
    by_hand = token_mean("neural_mirror", batch, params_path=mirror_path)
    report["neural_mirror"] = [mirror - base, COEF * by_hand, mirror_logged, by_hand]
    try:
        core_algos.kl_penalty(torch.zeros(1), torch.zeros(1), "ebpo:prob_l2=/x.json")
        report["bad_spec_error"] = None
    except ValueError as exc:
        report["bad_spec_error"] = str(exc)
    with open(out_path, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
