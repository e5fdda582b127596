"""verl adapter: JSPO, SPO and KRPO under verl's names, and the prompt key that SPO and carried KRPO need.

verl's ``uid`` is drawn afresh for every prompt at every step, so SPO's tracker and KRPO's carried filters
key each prompt by the batch's ``index`` field (verl's dataset copies ``extra_info["index"]`` there) or
``+algorithm.ebpo.prompt_key``. verl is not installed here: the batch's fields reach ebpo's functions through
``install_batch_forwarding`` on stand-ins for verl 0.9.1's ``ray_trainer.compute_advantage`` (legacy trainer,
``non_tensor_batch``) and the v1 trainer's ``_compute_advantage`` (TransferQueue), as in test_verl_options.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ebpo import build_estimator
from ebpo.estimators import stable_prompt_ids
from ebpo.integrations import verl as adapter

NEW = ["jspo", "spo", "krpo", "krpo_carry"]
PROMPT_KEYED = ["spo", "krpo_carry"]


@pytest.fixture(autouse=True)
def _fresh_estimators():
    adapter.ESTIMATORS.clear()
    yield
    adapter.ESTIMATORS.clear()


def verl_step(step: int):
    """3 prompts x 4 responses; fresh uids every step (as verl's), dataset indices from a pool of 4 (they recur).

    Returns token rewards (bs, T) with the 0/1 score on the last response token, the mask, the uids, the
    scores (bs,) and each sample's dataset index (bs,)."""
    gen = torch.Generator().manual_seed(step)
    bs, length = 12, 5
    lengths = torch.randint(1, length + 1, (bs,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()  # (bs, T)
    scores = (torch.rand(bs, generator=gen) < 0.5).float()  # (bs,)
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = scores
    prompts = torch.randperm(4, generator=gen)[:3].tolist()  # which dataset rows this step asks
    uids = np.array([f"uid-{step}-{i // 4}" for i in range(bs)], dtype=object)
    index = np.array([prompts[i // 4] for i in range(bs)], dtype=object)
    return token_rewards, mask, uids, scores, index


def group_ids(uids):
    return torch.as_tensor(np.unique(uids.astype(str), return_inverse=True)[1])


def reference_of(key):
    spec = dict(adapter.SPECS[key])
    return build_estimator(spec.pop("name"), **spec)


def stand_in_ray_trainer():
    """verl 0.9.1's ray_trainer.compute_advantage for a registered estimator: the uids and config, nothing else."""

    def compute_advantage(data, adv_estimator, config=None, **_):
        fn = adapter.FUNCTIONS[adv_estimator]
        index = data.non_tensor_batch["uid"]
        advantages, _ = fn(data.batch["token_level_rewards"], data.batch["response_mask"], index=index, config=config)
        return advantages

    module = types.SimpleNamespace(__name__="ray_trainer", compute_advantage=compute_advantage)
    adapter.install_batch_forwarding(module, v1_trainers=())
    return module


def legacy_call(module, key, token_rewards, mask, non_tensor, config=None):
    data = types.SimpleNamespace(
        batch={"token_level_rewards": token_rewards, "token_level_scores": token_rewards, "response_mask": mask},
        non_tensor_batch=non_tensor,
    )
    return module.compute_advantage(data, key, config={"adv_estimator": key, **(config or {})})


# ------------------------------------------------------------------ names, std flag, state


def test_the_names_build_the_estimators():
    assert {key: adapter.SPECS[key] for key in NEW} == {
        "jspo": {"name": "jspo"},
        "spo": {"name": "spo"},
        "krpo": {"name": "krpo"},
        "krpo_carry": {"name": "krpo", "carry": True},
    }
    for key in NEW:
        assert f"``{key}``" in adapter.__doc__  # a row of the module docstring's table


def test_norm_adv_by_std_off():
    """spo's batch std division goes; jspo has none (as its code) and krpo's scale is its filter's, not a std."""
    assert adapter.estimator_spec("spo", norm_adv_by_std_in_grpo=False) == {"name": "spo", "std_normalize": False}
    assert adapter.estimator_spec("jspo", norm_adv_by_std_in_grpo=False) == {"name": "jspo"}
    assert adapter.estimator_spec("krpo", norm_adv_by_std_in_grpo=False) == {"name": "krpo"}
    assert adapter.estimator_spec("krpo_carry", norm_adv_by_std_in_grpo=False) == {"name": "krpo", "carry": True}
    token_rewards, mask, uids, scores, index = verl_step(0)
    module = stand_in_ray_trainer()
    off = legacy_call(
        module, "spo", token_rewards, mask, {"uid": uids, "index": index}, {"norm_adv_by_std_in_grpo": False}
    )
    reference = build_estimator("spo", std_normalize=False)
    expected, _ = reference(scores, group_ids(uids), prompt_ids=stable_prompt_ids(list(index)))
    assert torch.allclose(off, expected.float().unsqueeze(-1) * mask, atol=1e-6)


def test_what_is_stateful():
    """Resuming spo / krpo_carry from a checkpoint without their state is refused (their tracker would restart)."""
    assert {key: adapter._is_stateful(key) for key in NEW} == {
        "jspo": False,
        "spo": True,
        "krpo": False,
        "krpo_carry": True,
    }


def test_carry_is_fixed_by_the_name():
    with pytest.raises(ValueError, match=r"estimator_options.carry: algorithm.adv_estimator=krpo fixes it"):
        adapter.estimator_spec("krpo", options=adapter.VerlOptions(estimator_options={"carry": True}))


# ------------------------------------------------------------------ the prompt key, legacy trainer


@pytest.mark.parametrize("key", NEW)
def test_names_match_the_core_over_steps_keyed_by_the_dataset_index(key):
    """3 steps through the legacy trainer's path: uids change every step, the index keys SPO's / KRPO's state."""
    module = stand_in_ray_trainer()
    reference = reference_of(key)
    for step in range(3):
        token_rewards, mask, uids, scores, index = verl_step(step)
        non_tensor = {"uid": uids, "index": index.astype(np.int64)}  # numpy ints, as verl's collate gives
        advantages = legacy_call(module, key, token_rewards, mask, non_tensor)
        prompt_ids = stable_prompt_ids(list(index))
        expected, _ = reference(scores, group_ids(uids), prompt_ids=prompt_ids)
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)
    state = adapter.ESTIMATORS[key].state_dict()
    assert set(state) == set(reference.state_dict())
    if key in PROMPT_KEYED:  # the state is keyed by the dataset's prompts, never by a uid
        held = state["estimator_state"]["keys"] if "estimator_state" in state else state["keys"]
        assert set(held.tolist()) <= set(stable_prompt_ids(list(range(4))).tolist())
        assert held.numel() >= 3


def test_the_key_comes_from_extra_info_when_the_field_is_absent():
    """A batch with extra_info but no copied index field: extra_info["index"] keys the prompts, same state."""
    module = stand_in_ray_trainer()
    runs = []
    for from_extra_info in (False, True):
        adapter.ESTIMATORS.clear()
        advantages = []
        for step in range(2):
            token_rewards, mask, uids, _, index = verl_step(step)
            extra = np.array([{"index": int(i), "split": "train"} for i in index], dtype=object)
            fields = {"uid": uids, "extra_info": extra} if from_extra_info else {"uid": uids, "index": index}
            advantages.append(legacy_call(module, "spo", token_rewards, mask, fields))
        runs.append((advantages, adapter.ESTIMATORS["spo"].state_dict()["estimator_state"]["keys"]))
    (a, a_keys), (b, b_keys) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a_keys, b_keys) and a_keys.numel() >= 3


def test_prompt_key_names_another_field():
    module = stand_in_ray_trainer()
    reference = reference_of("krpo_carry")
    for step in range(2):
        token_rewards, mask, uids, scores, index = verl_step(step)
        problem = np.array([f"problem-{i}" for i in index], dtype=object)
        non_tensor = {"uid": uids, "index": np.zeros(len(uids), dtype=object), "problem_id": problem}
        advantages = legacy_call(
            module, "krpo_carry", token_rewards, mask, non_tensor, {"ebpo": {"prompt_key": "problem_id"}}
        )
        expected, _ = reference(scores, group_ids(uids), prompt_ids=stable_prompt_ids(list(problem)))
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)


@pytest.mark.parametrize("key", PROMPT_KEYED)
def test_no_prompt_key_is_refused_never_the_uid(key):
    """A batch without the field (nor extra_info's entry): an error naming it, and the state did not move."""
    module = stand_in_ray_trainer()
    token_rewards, mask, uids, _, _ = verl_step(0)
    with pytest.raises(ValueError, match=r"needs each sample's prompt key.*no 'index' field.*prompt_key=FIELD"):
        legacy_call(module, key, token_rewards, mask, {"uid": uids})
    with pytest.raises(ValueError, match=r"no 'problem_id' field"):
        legacy_call(module, key, token_rewards, mask, {"uid": uids}, {"ebpo": {"prompt_key": "problem_id"}})
    state = adapter.ESTIMATORS[key].state_dict()
    held = state["estimator_state"]["keys"] if "estimator_state" in state else state["keys"]
    assert held.numel() == 0


@pytest.mark.parametrize("key", PROMPT_KEYED)
def test_one_key_for_every_prompt_is_refused(key):
    """verl's dataset gives a row without extra_info["index"] the index 0: all prompts would share one state."""
    module = stand_in_ray_trainer()
    token_rewards, mask, uids, _, _ = verl_step(0)
    zeros = np.zeros(len(uids), dtype=object)
    with pytest.raises(ValueError, match=r"all 3 prompts \(distinct uids\) of this batch have the same 'index', 0"):
        legacy_call(module, key, token_rewards, mask, {"uid": uids, "index": zeros})
    some_missing = np.array([None] + [1] * (len(uids) - 1), dtype=object)
    with pytest.raises(ValueError, match=r"1 of 12 samples have no 'index'"):
        legacy_call(module, key, token_rewards, mask, {"uid": uids, "index": some_missing})


def test_the_other_names_need_no_prompt_key():
    """jspo and krpo (fresh filters) keep nothing per prompt: a batch without an index runs, one index too."""
    module = stand_in_ray_trainer()
    token_rewards, mask, uids, scores, _ = verl_step(0)
    for key in ("jspo", "krpo"):
        advantages = legacy_call(module, key, token_rewards, mask, {"uid": uids})
        expected, _ = reference_of(key)(scores, group_ids(uids))
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)


def test_a_bad_prompt_key_option_is_named():
    with pytest.raises(ValueError, match=r"algorithm.ebpo.prompt_key must name a field"):
        adapter.verl_options({"ebpo": {"prompt_key": ""}})
    assert adapter.verl_options({"ebpo": {"prompt_key": "problem_id"}}).prompt_key == "problem_id"


# ------------------------------------------------------------------ the prompt key, v1 trainer (TransferQueue)


class V1Trainer:
    """verl 0.9.1's v1 PPOTrainer._compute_advantage as ebpo depends on it: it reads only uid, response_mask and
    rm_scores from TransferQueue and calls compute_advantage with non_tensor_batch = {uid}."""

    def __init__(self, store, ray_trainer, algorithm):
        self.store, self.ray_trainer = store, ray_trainer
        self.config = types.SimpleNamespace(algorithm=algorithm)

    def _compute_advantage(self, batch, metrics):
        data = self.store(batch.keys, batch.partition_id, ["uid", "response_mask", "rm_scores"])
        scores = torch.nn.utils.rnn.pad_sequence(data["rm_scores"], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence(data["response_mask"], batch_first=True).float()
        proto = types.SimpleNamespace(
            batch={"token_level_scores": scores, "token_level_rewards": scores, "response_mask": mask},
            non_tensor_batch={"uid": np.array(data["uid"], dtype=object)},
        )
        return self.ray_trainer.compute_advantage(
            proto, self.config.algorithm["adv_estimator"], config=self.config.algorithm
        )


@pytest.fixture
def v1(monkeypatch):
    rows: dict[str, dict] = {}
    reads: list[list[str]] = []

    def kv_batch_get(keys, partition_id, fields):  # TransferQueue leaves out a field the samples lack, silently
        reads.append(list(fields))
        return {f: [rows[k][f] for k in keys] for f in fields if f in rows[keys[0]]}

    monkeypatch.setattr(adapter, "_tq_get", kv_batch_get)
    module = stand_in_ray_trainer()
    cls = type("PPOTrainer", (V1Trainer,), {})
    adapter.install_batch_forwarding(module, v1_trainers=(cls,))

    def put(step, with_index=True):
        token_rewards, mask, uids, scores, index = verl_step(step)
        keys = [f"{uid}_{i % 4}_0" for i, uid in enumerate(uids)]
        lengths = mask.sum(-1).long()
        for i, k in enumerate(keys):
            row = {"uid": uids[i], "response_mask": mask[i, : lengths[i]], "rm_scores": token_rewards[i, : lengths[i]]}
            if with_index:
                row["index"] = torch.tensor(index[i])  # a 0-d tensor, as TransferQueue may hand back a number
                row["extra_info"] = {"index": int(index[i])}
            rows[k] = row
        return types.SimpleNamespace(keys=keys, partition_id="train"), (mask, uids, scores, index)

    return types.SimpleNamespace(module=module, cls=cls, put=put, reads=reads)


def test_v1_trainer_spo_reads_the_index_from_transfer_queue(v1):
    trainer = v1.cls(adapter._tq_get, v1.module, {"adv_estimator": "spo"})
    reference = reference_of("spo")
    for step in range(3):
        meta, (mask, uids, scores, index) = v1.put(step)
        advantages = trainer._compute_advantage(meta, {})
        expected, _ = reference(scores, group_ids(uids), prompt_ids=stable_prompt_ids([int(i) for i in index]))
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)
    assert v1.reads[0] == ["uid", "index", "extra_info"]  # ebpo's read, then verl's
    assert torch.equal(
        adapter.ESTIMATORS["spo"].state_dict()["estimator_state"]["keys"],
        reference.state_dict()["estimator_state"]["keys"],
    )
    meta, _ = v1.put(5, with_index=False)
    with pytest.raises(ValueError, match=r"no 'index' field"):
        trainer._compute_advantage(meta, {})


def test_v1_trainer_jspo_reads_nothing_more(v1):
    meta, _ = v1.put(0, with_index=False)
    v1.cls(adapter._tq_get, v1.module, {"adv_estimator": "jspo"})._compute_advantage(meta, {})
    assert v1.reads == [["uid", "response_mask", "rm_scores"]]


# ------------------------------------------------------------------ verl's own code (scripts/test-verl.sh)


def test_spo_through_verls_own_compute_advantage():
    """verl 0.9.1's ray_trainer.compute_advantage on a DataProto with verl's dataset ``index`` field: 3 steps of spo
    keyed by the index, fresh uids every step; the batch with every index 0 (a dataset without extra_info.index)
    is refused. Runs where verl is installed."""
    pytest.importorskip("verl")
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

    adapter.register()
    adapter.install_batch_forwarding()  # what the plugin does in each verl process
    reference = reference_of("spo")
    for step in range(3):
        token_rewards, mask, uids, scores, index = verl_step(step)
        data = DataProto.from_dict(
            tensors={"token_level_rewards": token_rewards, "response_mask": mask, "responses": torch.zeros_like(mask)},
            non_tensors={"uid": uids, "index": index.astype(np.int64)},  # verl's dataset: an int per row
        )
        out = ray_trainer.compute_advantage(data, adv_estimator="spo", num_repeat=4)
        expected, _ = reference(scores, group_ids(uids), prompt_ids=stable_prompt_ids(list(index)))
        assert torch.allclose(out.batch["advantages"], expected.float().unsqueeze(-1) * mask, atol=1e-6)
    assert torch.equal(
        adapter.ESTIMATORS["spo"].state_dict()["estimator_state"]["keys"],
        reference.state_dict()["estimator_state"]["keys"],
    )
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask, "responses": torch.zeros_like(mask)},
        non_tensors={"uid": uids, "index": np.zeros(len(uids), dtype=np.int64)},
    )
    with pytest.raises(ValueError, match=r"have the same 'index', 0"):
        ray_trainer.compute_advantage(data, adv_estimator="spo", num_repeat=4)
