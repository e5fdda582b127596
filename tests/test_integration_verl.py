"""verl adapter: verl's signature and tensors in, ebpo's advantages out; state survives save/load.

verl itself is not installed here (its runtime pulls Ray and a GPU stack); everything up to its registry
call is tested with verl's tensor layout: token-level rewards on the last response token, a response
mask, and a numpy object array of uid strings.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ebpo import build_estimator
from ebpo.estimators import stable_prompt_ids
from ebpo.grouping import stable_topic_ids
from ebpo.integrations import verl as adapter

TOPIC_OF_UID = {"uid-0": "gsm8k", "uid-1": "math", "uid-2": "gsm8k"}
PROMPT_OF_UID = {"uid-0": 10, "uid-1": 11, "uid-2": 12}  # each sample's dataset index (spo / krpo_carry's key)


def verl_batch(seed: int, values=(0.0, 1.0)):
    """Reward on the last response token, a response mask, uid strings; scores drawn from ``values`` (low, high)."""
    gen = torch.Generator().manual_seed(seed)
    bs, length = 12, 7
    lengths = torch.randint(1, length + 1, (bs,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (bs, T)
    low, high = values
    scores = torch.where(torch.rand(bs, generator=gen) < 0.4, high, low)
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = scores  # verl puts the reward on the last response token
    uids = np.array([f"uid-{i % 3}" for i in torch.randperm(bs, generator=gen).tolist()], dtype=object)
    return token_rewards, mask, uids, scores


def batch_fields(uids, scores):
    """What verl's batch carries beside the uids: each sample's data_source, its reward extra info's acc and its
    prompt key."""
    sources = np.array([TOPIC_OF_UID[u] for u in uids], dtype=object)
    prompts = np.array([PROMPT_OF_UID[u] for u in uids], dtype=object)
    return {"data_source": sources, "acc": (scores > 0).numpy(), "prompt_labels": prompts}


def same_state(a, b) -> bool:
    """Nested state dicts equal, tensors (the hierarchical prior's per-topic accumulators) bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def reference_call(reference, uids, scores, fields):
    """ebpo's core on the same batch: group ids from the uids, the topics and correctness the fields give."""
    _, group_ids = np.unique(uids.astype(str), return_inverse=True)
    return reference(
        scores,
        torch.as_tensor(group_ids),
        topic_ids=stable_topic_ids(list(fields["data_source"])),
        correctness=torch.as_tensor(fields["acc"], dtype=torch.float64),
        prompt_ids=stable_prompt_ids(list(fields["prompt_labels"])),
    )


@pytest.mark.parametrize("key", sorted(adapter.SPECS))
def test_functions_match_ebpo_core_over_steps(key):
    adapter.ESTIMATORS.clear()
    spec = dict(adapter.SPECS[key])
    reference = build_estimator(spec.pop("name"), **spec)
    for step in range(3):
        token_rewards, mask, uids, scores = verl_batch(step)
        fields = batch_fields(uids, scores)
        advantages, returns = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, config=None, **fields)
        expected, _ = reference_call(reference, uids, scores, fields)
        assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)
        assert torch.equal(advantages, returns) and bool((advantages[mask == 0] == 0).all())
    assert same_state(adapter.ESTIMATORS[key].state_dict(), reference.state_dict())


def test_state_survives_save_and_load(tmp_path):
    adapter.ESTIMATORS.clear()
    for step in range(2):
        token_rewards, mask, uids, _ = verl_batch(step)
        adapter.FUNCTIONS["ebpo_running"](token_rewards, mask, index=uids)
    saved = adapter.ESTIMATORS["ebpo_running"].state_dict()
    adapter.save_estimator_states(str(tmp_path))
    adapter.ESTIMATORS.clear()
    adapter.load_estimator_states(str(tmp_path))
    assert adapter.ESTIMATORS["ebpo_running"].state_dict() == saved


def test_errors():
    token_rewards, mask, uids, _ = verl_batch(0)
    with pytest.raises(ValueError, match="uid index"):
        adapter.FUNCTIONS["ebpo"](token_rewards, mask)
    with pytest.raises(ValueError, match="differ"):
        adapter.FUNCTIONS["ebpo"](token_rewards[:, :3], mask, index=uids)
    if importlib.util.find_spec("verl") is None:
        with pytest.raises(ImportError, match="needs verl"):
            adapter.register()
    else:  # pragma: no cover - only where verl is installed
        assert adapter.register() == sorted(adapter.SPECS)


def test_topics_from_non_tensor_batch_reach_the_hierarchical_prior():
    """install_batch_forwarding on a stand-in for verl's ray_trainer: verl's compute_advantage passes only the uids."""
    import types

    def verl_compute_advantage(data, adv_estimator, config=None):  # what verl does for registered estimators
        fn = adapter.FUNCTIONS[adv_estimator]
        return fn(
            data.batch["token_level_rewards"],
            data.batch["response_mask"],
            index=data.non_tensor_batch["uid"],
            config=config,
        )

    fake = types.SimpleNamespace(__name__="ray_trainer", compute_advantage=verl_compute_advantage)
    adapter.install_batch_forwarding(fake, v1_trainers=())
    adapter.install_batch_forwarding(fake, v1_trainers=())  # idempotent
    assert fake.compute_advantage._ebpo_wrapped is verl_compute_advantage
    adapter.ESTIMATORS.clear()
    reference = build_estimator("ebpo", prior="running", hierarchical=True)
    for step in range(3):
        token_rewards, mask, uids, scores = verl_batch(step)
        sources = np.array([TOPIC_OF_UID[u] for u in uids], dtype=object)
        data = types.SimpleNamespace(
            batch={"token_level_rewards": token_rewards, "response_mask": mask},
            non_tensor_batch={"uid": uids, "data_source": sources},
        )
        advantages, _ = fake.compute_advantage(data, "ebpo_hier_running")
        _, group_ids = np.unique(uids.astype(str), return_inverse=True)
        expected, metrics = reference(scores, torch.as_tensor(group_ids), topic_ids=stable_topic_ids(list(sources)))
        assert torch.allclose(advantages[:, 0], expected.float() * mask[:, 0], atol=1e-6)
        assert metrics["ebpo/num_topics"] == 2.0
    assert adapter._BATCH_FIELDS.get() is None  # nothing outlives the call
    # an explicit keyword (verl variants that forward data_source) works without the wrapper
    token_rewards, mask, uids, scores = verl_batch(9)
    adapter.ESTIMATORS.clear()
    sources = np.array(["x" if u == "uid-0" else "y" for u in uids], dtype=object)
    a, _ = adapter.FUNCTIONS["ebpo_hier"](token_rewards, mask, index=uids, data_source=sources)
    b, _ = adapter.FUNCTIONS["ebpo"](token_rewards, mask, index=uids)
    assert not torch.allclose(a, b)  # the topics changed the prior
    with pytest.raises(ValueError, match="different topic ids"):  # a topic per sample that splits a group is a bug
        adapter.FUNCTIONS["ebpo_hier"](
            token_rewards, mask, index=uids, data_source=np.array(["x"] * 6 + ["y"] * 6, dtype=object)
        )


@pytest.mark.parametrize("key", ["ebpo_hier", "ebpo_hier_running"])
def test_a_hierarchical_name_without_topics_refuses_never_runs_flat(key):
    """No topic in the batch: raise at the first call, naming the field and the option; no flat EBPO in its place."""
    adapter.ESTIMATORS.clear()
    token_rewards, mask, uids, _ = verl_batch(0)
    with pytest.raises(ValueError, match=r"no 'data_source' field.*\+algorithm\.ebpo\.topic_key=COLUMN"):
        adapter.FUNCTIONS[key](token_rewards, mask, index=uids)
    with pytest.raises(ValueError, match="no 'subject' field"):  # the option names the field it reads
        adapter.FUNCTIONS[key](
            token_rewards, mask, index=uids, config={"ebpo": {"topic_key": "subject"}}, data_source=np.array(uids)
        )
    sources = np.array([TOPIC_OF_UID[u] for u in uids], dtype=object)
    a, _ = adapter.FUNCTIONS[key](
        token_rewards, mask, index=uids, config={"ebpo": {"topic_key": "subject"}}, subject=sources
    )
    b, _ = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, data_source=sources)
    assert torch.equal(a, b) or key.endswith("running")  # (the running prior moved between the two calls)


# What norm_adv_by_std_in_grpo=False does to each name: the estimator built without its std division.
STD_OFF_REFERENCE = {
    "ebpo": {"name": "ebpo", "prior": "batch", "std_normalize": False},
    "ebpo_running": {"name": "ebpo", "prior": "running", "std_normalize": False},
    "ebpo_ema": {"name": "ebpo", "prior": "ema", "std_normalize": False},
    "ha_dw": {"name": "grpo", "weighting": "ha_dw", "scale": "none"},
    "ebpo_ha_dw": {"name": "ebpo", "weighting": "ha_dw", "std_normalize": False},
    "ebpo_hier": {"name": "ebpo", "prior": "batch", "hierarchical": True, "std_normalize": False},
    "ebpo_hier_running": {"name": "ebpo", "prior": "running", "hierarchical": True, "std_normalize": False},
    "jspo": {"name": "jspo"},  # no std division (as JSPO's code)
    "spo": {"name": "spo", "std_normalize": False},
    "krpo": {"name": "krpo"},  # its scale is the filter's 1/sqrt(P), not a std
    "krpo_carry": {"name": "krpo", "carry": True},
}


def test_every_name_has_a_std_off_form():
    assert sorted(STD_OFF_REFERENCE) == sorted(adapter.SPECS)
    for key, spec in STD_OFF_REFERENCE.items():
        assert adapter.estimator_spec(key, norm_adv_by_std_in_grpo=False) == spec
        assert adapter.estimator_spec(key) == adapter.SPECS[key]  # the flag's default (True) changes nothing


class AlgoConfigLike:
    """verl's AlgoConfig: a frozen dataclass read with .get(key, default)."""

    def __init__(self, **values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


@pytest.mark.parametrize("key", sorted(adapter.SPECS))
@pytest.mark.parametrize("config_type", [dict, AlgoConfigLike])
def test_norm_adv_by_std_off_turns_the_estimators_std_division_off(key, config_type):
    """verl's algorithm.norm_adv_by_std_in_grpo=False reaches every name as its std division off, over 3 steps."""
    adapter.ESTIMATORS.clear()
    spec = dict(STD_OFF_REFERENCE[key])
    reference = build_estimator(spec.pop("name"), **spec)
    config = config_type(adv_estimator=key, norm_adv_by_std_in_grpo=False)
    for step in range(3):
        token_rewards, mask, uids, scores = verl_batch(step)
        fields = batch_fields(uids, scores)
        advantages, _ = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, config=config, **fields)
        expected, _ = reference_call(reference, uids, scores, fields)
        assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)
    scaled, _ = adapter.FUNCTIONS[key](
        token_rewards, mask, index=uids, config=config_type(norm_adv_by_std_in_grpo=True), **fields
    )
    if STD_OFF_REFERENCE[key] != adapter.SPECS[key]:  # a name with a std division to remove
        assert not torch.allclose(scaled, advantages, atol=1e-3)  # the flag is what made the difference


def test_switching_the_flag_keeps_the_prior():
    """The state is the same whatever the std division: a config read later rebuilds the estimator, state carried."""
    adapter.ESTIMATORS.clear()
    reference = build_estimator("ebpo", prior="running", std_normalize=False)
    for step in range(3):
        token_rewards, mask, uids, scores = verl_batch(step)
        adapter.FUNCTIONS["ebpo_running"](token_rewards, mask, index=uids, config={"norm_adv_by_std_in_grpo": step > 0})
        _, group_ids = np.unique(uids.astype(str), return_inverse=True)
        reference(scores, torch.as_tensor(group_ids))
    assert adapter.ESTIMATORS["ebpo_running"].state_dict() == reference.state_dict()
    assert adapter.ESTIMATORS["ebpo_running"].estimator.std_normalize is True


def test_a_non_boolean_flag_is_refused():
    token_rewards, mask, uids, _ = verl_batch(0)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo must be true or false"):
        adapter.FUNCTIONS["ha_dw"](token_rewards, mask, index=uids, config={"norm_adv_by_std_in_grpo": "false"})


def test_docstring_examples():
    import doctest

    result = doctest.testmod(adapter)
    assert result.attempted > 0 and result.failed == 0
