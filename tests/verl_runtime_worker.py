"""Run under a real verl with VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin (see test_integration_verl_runtime.py).

Calls verl's own driver and worker code with ebpo plugged in and prints a JSON report; the test asserts on it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import tempfile

import numpy as np
import torch
import verl  # noqa: F401  (imports the external modules: our plugin registers and installs here)
from omegaconf import OmegaConf
from tensordict import TensorDict
from torchdata.stateful_dataloader import StatefulDataLoader
from transfer_queue import KVBatchMeta
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils import tensordict_utils as tu
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.config import FSDPActorConfig
from verl.workers.utils import losses
from verl.workers.utils.padding import no_padding_2_padding

from ebpo import build_estimator
from ebpo.divergences import NeuralMirror, build_divergence
from ebpo.grouping import stable_topic_ids
from ebpo.integrations import verl as adapter
from ebpo.integrations import verl_plugin


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


# ------------------------------------------------------------------ checkpoints through verl's trainers
VERL_CONFIG = os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "_generated_ppo_trainer.yaml")


@functools.cache
def verl_config():
    """verl's full default PPO config (the generated ppo_trainer.yaml), read once."""
    return OmegaConf.load(VERL_CONFIG)


class WorkerGroupStandIn:
    """The actor worker group (Ray workers on GPUs): records verl's save/load calls, writes the actor folder."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        self.calls.append(("save", local_path))

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.calls.append(("load", local_path))


def trainer_on_cpu(trainer_cls: type, root: str, key: str, resume_mode: str, norm: bool, resume_from_path=None):
    """verl's trainer class, its own _save_checkpoint/_load_checkpoint, with verl's full default config.

    Built without __init__ (which starts Ray worker groups on GPUs); the attributes the two methods read are
    set as __init__/init() would: config, the actor worker group (a stand-in), a real StatefulDataLoader.
    """
    config = copy.deepcopy(verl_config())
    config.trainer.default_local_dir = root
    config.trainer.resume_mode = resume_mode
    config.trainer.resume_from_path = resume_from_path
    config.algorithm.adv_estimator = key
    config.algorithm.norm_adv_by_std_in_grpo = norm
    config.actor_rollout_ref.rollout.n = 4
    trainer = object.__new__(trainer_cls)
    trainer.config = config
    trainer.global_steps = 0
    trainer.use_critic = False
    trainer.actor_rollout_wg = WorkerGroupStandIn()
    trainer.train_dataloader = StatefulDataLoader(list(range(64)), batch_size=4)
    trainer.trainer_mode = "sync"  # v1
    trainer.checkpoint_callback = build_checkpoint_callback(config)  # v1: verl's own (the no-op default)
    return trainer


def checkpoint_batch(step: int) -> DataProto:
    gen = torch.Generator().manual_seed(1000 + step)
    bs, length = 16, 5
    lengths = torch.randint(1, length + 1, (bs,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = (torch.rand(bs, generator=gen) < 0.2 + 0.15 * step).float()
    return DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask},
        non_tensors={
            "uid": np.array([f"s{step}-p{i // 4}" for i in range(bs)], dtype=object),
            "data_source": np.array(["gsm8k" if i < 8 else "math" for i in range(bs)], dtype=object),
            "acc": (token_rewards.sum(-1) > 0).numpy(),  # the reward extra info HA-DW reads
        },
    )


def train_step(trainer) -> torch.Tensor:
    """One step's advantages as each trainer computes them in the driver (its call, its arguments)."""
    trainer.global_steps += 1
    data = checkpoint_batch(trainer.global_steps)
    algorithm = trainer.config.algorithm
    arguments = dict(
        adv_estimator=algorithm.adv_estimator,
        gamma=algorithm.gamma,
        lam=algorithm.lam,
        num_repeat=trainer.config.actor_rollout_ref.rollout.n,
        norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True),
        config=algorithm,
    )
    if isinstance(trainer, PPOTrainerSync):  # PPOTrainer._compute_advantage
        keys = [f"{uid}_0_0" for uid in data.non_tensor_batch["uid"]]
        data = compute_advantage_for_multi_trajectories(data, batch_keys=keys, **arguments)
    else:  # RayPPOTrainer.fit
        data = compute_advantage(data, **arguments)
    return data.batch["advantages"].clone()


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def resume_through_verls_checkpoints(trainer_cls: type, key: str, resume_mode: str, norm: bool) -> dict:
    """Train 3 steps, verl's _save_checkpoint, 2 more steps; then, in a fresh estimator state, verl's
    _load_checkpoint and the same 2 steps. Also the control: the 2 steps without the restore."""
    root = tempfile.mkdtemp()
    adapter.ESTIMATORS.clear()
    first = trainer_on_cpu(trainer_cls, root, key, "auto", norm)
    first._load_checkpoint()  # verl calls it at init: nothing to resume yet
    for _ in range(3):
        train_step(first)
    first._save_checkpoint()
    uninterrupted = [train_step(first) for _ in range(2)]
    final_state = adapter.ESTIMATORS[key].state_dict()
    folder = os.path.join(root, "global_step_3")

    adapter.ESTIMATORS.clear()  # what a new driver process starts with
    resumed = trainer_on_cpu(trainer_cls, root, key, resume_mode, norm, resume_from_path=folder)
    resumed._load_checkpoint()
    resumed_step = resumed.global_steps
    after_resume = [train_step(resumed) for _ in range(2)]
    state_equal = same_state(adapter.ESTIMATORS[key].state_dict(), final_state)

    adapter.ESTIMATORS.clear()
    fresh = trainer_on_cpu(trainer_cls, root, key, "disable", norm)
    fresh._load_checkpoint()
    fresh.global_steps = 3
    without_restore = [train_step(fresh) for _ in range(2)]
    return {
        "files": sorted(os.listdir(folder)),
        "tracker": open(os.path.join(root, "latest_checkpointed_iteration.txt")).read(),
        "resumed_step": resumed_step,
        "actor_loaded": resumed.actor_rollout_wg.calls == [("load", os.path.join(folder, "actor"))],
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(after_resume, uninterrupted)),
        "state_equal": state_equal,
        "control_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(without_restore, uninterrupted)),
    }


def checkpoint_report() -> dict:
    report = {"hooked": verl_plugin.CHECKPOINTING}
    cases = {}
    # Each trainer x each stateful name; resume modes and the std flag alternate so that every trainer meets
    # both modes and both flag values.
    for t, trainer_cls in enumerate((PPOTrainerSync, RayPPOTrainer)):
        for i, key in enumerate(("ebpo_running", "ebpo_ema", "ha_dw", "ebpo_ha_dw", "ebpo_hier_running")):
            mode, norm = ("auto", "resume_path")[i % 2], (True, False)[(i + t) % 2]
            cases[f"{trainer_cls.__name__}/{key}/{mode}/norm={norm}"] = resume_through_verls_checkpoints(
                trainer_cls, key, mode, norm
            )
    report["resume"] = cases
    # A checkpoint saved without the plugin: resuming it with a stateful estimator is refused.
    root = tempfile.mkdtemp()
    adapter.ESTIMATORS.clear()
    plain = trainer_on_cpu(PPOTrainerSync, root, "grpo", "auto", True)
    plain.global_steps = 2
    plain._save_checkpoint()
    report["grpo_files"] = sorted(os.listdir(os.path.join(root, "global_step_2")))
    try:
        trainer_on_cpu(PPOTrainerSync, root, "ebpo_running", "auto", True)._load_checkpoint()
        report["missing_state_error"] = None
    except ValueError as exc:
        report["missing_state_error"] = str(exc)
    return report


def norm_flag_through_verls_driver() -> float:
    """ha_dw with algorithm.norm_adv_by_std_in_grpo=false (verl's DictConfig) vs Dr. GRPO + HA-DW; max |diff|."""
    adapter.ESTIMATORS.clear()
    reference = build_estimator("grpo", scale="none", weighting="ha_dw")
    config = copy.deepcopy(verl_config().algorithm)
    config.norm_adv_by_std_in_grpo = False
    worst = 0.0
    for step in range(1, 4):
        data = checkpoint_batch(step)
        out = compute_advantage(data, adv_estimator="ha_dw", num_repeat=4, norm_adv_by_std_in_grpo=False, config=config)
        scores = data.batch["token_level_rewards"].sum(-1)
        expected, _ = reference(scores.double(), torch.arange(16) // 4)
        mask = data.batch["response_mask"]
        worst = max(worst, float((out.batch["advantages"] - expected.float()[:, None] * mask).abs().max()))
    return worst


# ------------------------------------------------------------------ the batch's fields under the v1 trainer
class TransferQueueInMemory:
    """verl's TransferQueue (a Ray service) in memory, for the calls the v1 trainer's advantage step makes.

    Each sample's fields are kept as verl's agent loop puts them; ``kv_batch_get`` assembles the selected fields
    with ``list_of_dict_to_tensordict`` (verl's own, what the agent loop uses to put them) and, as
    TransferQueue's ``select_fields`` does, leaves out a field the samples do not have.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.reads: list[list[str]] = []

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        if fields is not None:
            for name in fields.keys():
                values = fields[name].unbind() if isinstance(fields[name], torch.Tensor) else list(fields[name])
                for key, value in zip(keys, values, strict=True):
                    self.rows.setdefault(key, {})[name] = value
        return KVBatchMeta(keys=list(keys), tags=tags or [{} for _ in keys], partition_id=partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        names = [name for name in select_fields if name in self.rows[keys[0]]]
        self.reads.append(list(select_fields))
        return list_of_dict_to_tensordict([{name: self.rows[key][name] for name in names} for key in keys])


def put_rollout(store: TransferQueueInMemory, step: int, signed: bool, with_acc: bool = True) -> KVBatchMeta:
    """One step's 16 samples (4 prompts x 4) as verl's agent loop leaves them in TransferQueue: the dataset's fields
    (uid, data_source), the reward step's rm_scores (the score on the last response token) and extra_fields
    with the reward extra info. Scores 0/1, or -1/1 (verl's DAPO math scorer) when ``signed``."""
    gen = torch.Generator().manual_seed(2000 + step)
    bs, length = 16, 5
    lengths = torch.randint(1, length + 1, (bs,), generator=gen).tolist()
    correct = (torch.rand(bs, generator=gen) < 0.3 + 0.1 * step).tolist()
    keys, rows = [], []
    for i in range(bs):
        score = (1.0 if correct[i] else -1.0) if signed else float(correct[i])
        rm_scores = torch.zeros(lengths[i])
        rm_scores[-1] = score
        keys.append(f"s{step}-p{i // 4}_{i % 4}_0")  # verl's {uid}_{session}_{index}
        info = {"acc": bool(correct[i])} if with_acc else {}
        rows.append(
            {
                "uid": f"s{step}-p{i // 4}",
                "data_source": "gsm8k" if i < 8 else "math",
                "extra_fields": {"reward_extra_info": info, "min_global_steps": step},
                "response_mask": torch.ones(lengths[i], dtype=torch.int64),
                "rm_scores": rm_scores,
            }
        )
    store.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict(rows), tags=[{} for _ in keys])
    return KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train")


def v1_advantages(store, meta) -> tuple[torch.Tensor, torch.Tensor, list, list, list]:
    """What verl's v1 step wrote back: advantages (bs, T) padded, and the inputs a reference needs, by key."""
    rows = [store.rows[key] for key in meta.keys]
    length = max(len(row["response_mask"]) for row in rows)
    advantages = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length)
    for i, row in enumerate(rows):
        advantages[i, : len(row["advantages"])] = row["advantages"]
        mask[i, : len(row["response_mask"])] = 1.0
    scores = [float(row["rm_scores"].sum()) for row in rows]
    acc = [row["extra_fields"]["reward_extra_info"].get("acc") for row in rows]
    return advantages, mask, scores, [row["data_source"] for row in rows], acc


def v1_report() -> dict:
    """verl's v1 PPOTrainer._compute_advantage (its own code; TransferQueue in memory) with ebpo's names."""
    import transfer_queue

    store = TransferQueueInMemory()
    saved = transfer_queue.kv_batch_get, transfer_queue.kv_batch_put
    transfer_queue.kv_batch_get, transfer_queue.kv_batch_put = store.kv_batch_get, store.kv_batch_put
    from verl.trainer.ppo.v1 import utils as v1_utils

    # the v1 step's compute_advantage_for_multi_trajectories calls the name v1's utils bound at import
    report: dict = {
        "hooked": verl_plugin.FORWARDING,
        "v1_utils_wrapped": compute_advantage is v1_utils.compute_advantage,
    }
    try:
        for key, signed, reference in (
            ("ebpo_hier_running", False, build_estimator("ebpo", prior="running", hierarchical=True)),
            ("ha_dw", True, build_estimator("grpo", weighting="ha_dw")),
            ("ebpo_ha_dw", True, build_estimator("ebpo", weighting="ha_dw")),
        ):
            adapter.ESTIMATORS.clear()
            trainer = trainer_on_cpu(PPOTrainerSync, tempfile.mkdtemp(), key, "disable", True)
            worst = 0.0
            for step in range(1, 4):
                meta = put_rollout(store, step, signed)
                trainer._compute_advantage(meta, metrics={})
                advantages, mask, scores, sources, acc = v1_advantages(store, meta)
                expected, metrics = reference(
                    torch.tensor(scores),
                    torch.arange(16) // 4,
                    topic_ids=stable_topic_ids(sources),
                    correctness=torch.tensor(acc, dtype=torch.float64),
                )
                worst = max(worst, float((advantages - expected.float()[:, None] * mask).abs().max()))
            report[key] = {
                "max_abs_diff": worst,
                "reads": store.reads[-2],
                "state_equal": same_state(adapter.ESTIMATORS[key].state_dict(), reference.state_dict()),
            }
        # verl's own method without ebpo's hook: what a hierarchical name got before (no topic reaches it)
        adapter.ESTIMATORS.clear()
        trainer = trainer_on_cpu(PPOTrainerSync, tempfile.mkdtemp(), "ebpo_hier", "disable", True)
        unhooked = PPOTrainerSync._compute_advantage._ebpo_wrapped
        report["unhooked_hier_error"] = error_of(lambda: unhooked(trainer, put_rollout(store, 7, False), {}))
        # a -1/1 scorer without acc, under HA-DW: refused at the first step
        adapter.ESTIMATORS.clear()
        trainer = trainer_on_cpu(PPOTrainerSync, tempfile.mkdtemp(), "ha_dw", "disable", True)
        report["no_acc_error"] = error_of(
            lambda: trainer._compute_advantage(put_rollout(store, 8, True, with_acc=False), {})
        )
    finally:
        transfer_queue.kv_batch_get, transfer_queue.kv_batch_put = saved
    return report


def error_of(call) -> str | None:
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------ options through hydra
def hydra_config(overrides: list[str]):
    """verl's ppo_trainer config as its launcher composes it, with command-line overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.dirname(VERL_CONFIG), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def signed_batch(step: int) -> DataProto:
    """checkpoint_batch's samples scored by a -1/1 scorer that returns no acc (HA-DW then needs a threshold)."""
    data = checkpoint_batch(step)
    mask = data.batch["response_mask"]
    last = torch.nn.functional.one_hot(mask.sum(-1).long() - 1, mask.shape[1]).float()  # (bs, T) last response token
    data.batch["token_level_rewards"] = 2 * data.batch["token_level_rewards"] - last  # 0/1 -> -1/1
    data.non_tensor_batch.pop("acc")
    return data


def options_report() -> dict:
    """+algorithm.ebpo.* on verl's command line reach the estimator through verl's compute_advantage."""
    report = {}
    for key, overrides, reference, signed in (
        (
            "ebpo_ema",
            ["+algorithm.ebpo.estimator_options.decay=0.5"],
            build_estimator("ebpo", prior="ema", decay=0.5),
            False,
        ),
        (
            "ha_dw",
            ["+algorithm.ebpo.weighting_options.lam=1.5", "+algorithm.ebpo.correctness_threshold=0.0"],
            build_estimator("grpo", weighting="ha_dw", weighting_options={"lam": 1.5}),
            True,
        ),
    ):
        config = hydra_config([f"algorithm.adv_estimator={key}", *overrides])
        adapter.ESTIMATORS.clear()
        worst = 0.0
        for step in range(1, 4):
            data = signed_batch(step) if signed else checkpoint_batch(step)
            out = compute_advantage(data, adv_estimator=key, num_repeat=4, config=config.algorithm)
            scores = data.batch["token_level_rewards"].sum(-1)
            expected, _ = reference(scores.double(), torch.arange(16) // 4, correctness=(scores >= 0).double())
            mask = data.batch["response_mask"]
            worst = max(worst, float((out.batch["advantages"] - expected.float()[:, None] * mask).abs().max()))
        report[key] = {"max_abs_diff": worst, "options": OmegaConf.to_container(config.algorithm.ebpo)}
    config = hydra_config(["algorithm.adv_estimator=ebpo_ema", "+algorithm.ebpo.estimator_options.decayy=0.5"])
    adapter.ESTIMATORS.clear()
    report["typo_error"] = error_of(
        lambda: compute_advantage(checkpoint_batch(1), adv_estimator="ebpo_ema", num_repeat=4, config=config.algorithm)
    )
    return report


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
    report["checkpoints"] = checkpoint_report()
    report["ha_dw_std_off_max_abs_diff"] = norm_flag_through_verls_driver()
    report["v1"] = v1_report()
    report["options"] = options_report()
    with open(out_path, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
