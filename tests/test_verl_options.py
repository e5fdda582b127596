"""verl adapter: options through verl's config, HA-DW's correctness, and the batch's fields under both trainers.

verl is not installed here. verl passes a registered estimator ``(token_level_rewards, response_mask, index,
config=config.algorithm)``; the batch's other fields (the topic, the reward extra info, the score before
``use_kl_in_reward``) reach ebpo's functions through ``install_batch_forwarding``, tested on stand-ins for
verl 0.9.1's ``ray_trainer.compute_advantage`` and the v1 trainer's ``PPOTrainer._compute_advantage`` (which
reads only uid, response_mask and rm_scores from TransferQueue). ``test_integration_verl_runtime.py`` runs the
same hooks on verl's own code.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ebpo import build_estimator
from ebpo.grouping import stable_topic_ids
from ebpo.integrations import verl as adapter

TOPIC_OF_PROMPT = ["gsm8k", "math", "gsm8k"]


@pytest.fixture(autouse=True)
def _fresh_estimators():
    adapter.ESTIMATORS.clear()
    yield
    adapter.ESTIMATORS.clear()


def verl_batch(step: int, values):
    """3 prompts x 4 responses, scores drawn from ``values``, the reward on the last response token (verl)."""
    gen = torch.Generator().manual_seed(step)
    bs, length = 12, 5
    lengths = torch.randint(1, length + 1, (bs,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()  # (bs, T)
    choice = torch.randint(0, len(values), (bs,), generator=gen)
    scores = torch.tensor(values, dtype=torch.float32)[choice]  # (bs,)
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = scores
    uids = np.array([f"s{step}-p{i // 4}" for i in range(bs)], dtype=object)
    sources = np.array([TOPIC_OF_PROMPT[i // 4] for i in range(bs)], dtype=object)
    return token_rewards, mask, uids, scores, sources


def group_ids(uids):
    return torch.as_tensor(np.unique(uids.astype(str), return_inverse=True)[1])


# ------------------------------------------------------------------ HA-DW's correctness


@pytest.mark.parametrize("key", ["ha_dw", "ebpo_ha_dw"])
def test_hadw_on_minus_one_one_scores_weights_by_acc(key):
    """A -1/1 scorer (verl's DAPO math scorer) with its acc in the reward extra info: HA-DW reads acc, 3 steps."""
    spec = dict(adapter.SPECS[key])
    reference = build_estimator(spec.pop("name"), **spec)
    for step in range(3):
        token_rewards, mask, uids, scores, _ = verl_batch(step, (-1.0, 1.0))
        acc = (scores > 0).numpy()  # bools, as a scorer returning {"score": ..., "acc": bool} gives
        advantages, _ = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, acc=acc)
        expected, metrics = reference(scores, group_ids(uids), correctness=torch.as_tensor(acc, dtype=torch.float64))
        assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)
    assert adapter.ESTIMATORS[key].state_dict() == reference.state_dict()
    assert 0.0 <= reference.state_dict()["weighting_state"]["anchor"] <= 1.0  # a success rate


@pytest.mark.parametrize("key", ["ha_dw", "ebpo_ha_dw"])
def test_hadw_without_a_correctness_refuses_at_the_first_call(key):
    """No acc and no threshold: the first advantage call raises and names both ways out; nothing moved."""
    token_rewards, mask, uids, _, _ = verl_batch(0, (0.0, 1.0))  # even 0/1 scores: the source must be said
    with pytest.raises(ValueError, match=r"no 'acc' in its reward extra info.*correctness_threshold=T"):
        adapter.FUNCTIONS[key](token_rewards, mask, index=uids)
    assert adapter.ESTIMATORS[key].state_dict()["weighting_state"]["anchor"] is None


@pytest.mark.parametrize("key", ["ha_dw", "ebpo_ha_dw"])
def test_a_threshold_turns_scores_past_one_into_correctness(key):
    """Scores that sum past 1 (format 0.5 + accuracy 1.0): correct when score >= 1, as the threshold says."""
    spec = dict(adapter.SPECS[key])
    reference = build_estimator(spec.pop("name"), **spec)
    config = {"adv_estimator": key, "ebpo": {"correctness_threshold": 1.0}}
    for step in range(3):
        token_rewards, mask, uids, scores, _ = verl_batch(step, (0.0, 0.5, 1.0, 1.5))
        advantages, _ = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, config=config)
        expected, _ = reference(scores, group_ids(uids), correctness=(scores >= 1.0).double())
        assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)
    assert adapter.ESTIMATORS[key].state_dict() == reference.state_dict()


def test_a_threshold_on_the_score_before_kl_in_reward():
    """With use_kl_in_reward the rewards are shaped: the threshold applies to verl's score (token_level_scores)."""
    forwarded = install_on_stand_in()
    token_rewards, mask, uids, scores, _ = verl_batch(0, (0.0, 1.0))
    shaped = token_rewards - 0.3 * mask  # a KL penalty on every response token
    data = types.SimpleNamespace(
        batch={"token_level_scores": token_rewards, "token_level_rewards": shaped, "response_mask": mask},
        non_tensor_batch={"uid": uids},
    )
    config = {"adv_estimator": "ha_dw", "ebpo": {"correctness_threshold": 0.5}}
    advantages = forwarded.compute_advantage(data, "ha_dw", config=config)
    expected, _ = build_estimator("grpo", weighting="ha_dw")(
        shaped.sum(-1), group_ids(uids), correctness=(scores >= 0.5).double()
    )
    assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)


def test_correctness_key_names_another_field_and_the_threshold_applies_to_it():
    token_rewards, mask, uids, scores, _ = verl_batch(0, (-1.0, 1.0))
    passed = np.where(scores.numpy() > 0, 0.75, 0.25)  # a partial-credit verifier's extra output
    config = {"adv_estimator": "ha_dw", "ebpo": {"correctness_key": "passed", "correctness_threshold": 0.5}}
    advantages, _ = adapter.FUNCTIONS["ha_dw"](token_rewards, mask, index=uids, config=config, passed=passed)
    expected, _ = build_estimator("grpo", weighting="ha_dw")(
        scores, group_ids(uids), correctness=torch.as_tensor(passed >= 0.5, dtype=torch.float64)
    )
    assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)


@pytest.mark.parametrize(
    ("acc", "message"),
    [
        (lambda s: np.where(s > 0, 2.0, 0.0), r"'acc' .* holds values in \[0.0, 2.0\]"),
        (lambda s: np.array([None] + [1.0] * (len(s) - 1), dtype=object), "1 of 12 responses have no 'acc'"),
        (lambda s: np.array(["yes"] * len(s), dtype=object), "must be numbers or booleans"),
        (lambda s: np.full(len(s), np.nan), "NaN or infinite"),
    ],
)
def test_a_bad_acc_is_named(acc, message):
    token_rewards, mask, uids, scores, _ = verl_batch(0, (-1.0, 1.0))
    with pytest.raises(ValueError, match=message):
        adapter.FUNCTIONS["ha_dw"](token_rewards, mask, index=uids, acc=acc(scores.numpy()))


# ------------------------------------------------------------------ options through algorithm.ebpo


@pytest.mark.parametrize(
    ("key", "options", "reference"),
    [
        ("ebpo_ema", {"estimator_options": {"decay": 0.5}}, ("ebpo", {"prior": "ema", "decay": 0.5})),
        (
            "ha_dw",
            {"weighting_options": {"lam": 1.5, "anchor": "hard", "k": 3}, "correctness_threshold": 0.5},
            ("grpo", {"weighting": "ha_dw", "weighting_options": {"lam": 1.5, "anchor": "hard", "k": 3}}),
        ),
        (
            "ebpo_hier_running",
            {"estimator_options": {"pooling": "none"}, "topic_key": "subject"},
            ("ebpo", {"prior": "running", "hierarchical": True, "pooling": "none"}),
        ),
    ],
)
@pytest.mark.parametrize("config_type", [dict, "attributes"])
def test_options_reach_the_estimator(key, options, reference, config_type):
    """algorithm.ebpo's options build the estimator (3 steps equal ebpo's core built with them), and change it."""
    name, spec = reference
    default_spec = {k: v for k, v in adapter.SPECS[key].items() if k != "name"}
    expected_est, default_est = build_estimator(name, **spec), build_estimator(name, **default_spec)
    values = {"adv_estimator": key, "ebpo": options}
    config = values if config_type is dict else types.SimpleNamespace(**values)  # AlgoConfig reads as attributes
    differs = False
    for step in range(3):
        token_rewards, mask, uids, scores, sources = verl_batch(step, (0.0, 1.0))
        fields = {"subject": sources}
        advantages, _ = adapter.FUNCTIONS[key](token_rewards, mask, index=uids, config=config, **fields)
        inputs = dict(topic_ids=stable_topic_ids(list(sources)), correctness=(scores >= 0.5).double())
        expected, _ = expected_est(scores, group_ids(uids), **inputs)
        default, _ = default_est(scores, group_ids(uids), **inputs)
        assert torch.allclose(advantages, expected.unsqueeze(-1) * mask, atol=1e-6)
        differs |= not torch.allclose(expected, default, atol=1e-4)
    assert differs  # the option is what made the difference


@pytest.mark.parametrize(
    ("key", "options", "message"),
    [
        (
            "ebpo_ema",
            {"decay": 0.5},
            r"algorithm\.ebpo\.decay is not an ebpo option; the options are estimator_options",
        ),
        ("ebpo_ema", {"estimator_options": {"decayy": 0.5}}, "bad options for advantage estimator 'ebpo'.*decayy"),
        ("ha_dw", {"weighting_options": {"lamda": 1.5}}, "bad options for advantage weighting 'ha_dw'.*lamda"),
        ("ha_dw", {"weighting_options": {"lam": -1.0}}, "ha_dw lam must be > 0"),
        ("ebpo_running", {"estimator_options": {"prior": "ema"}}, "adv_estimator=ebpo_running fixes it"),
        ("ebpo", {"estimator_options": {"hierarchical": True}}, "adv_estimator=ebpo fixes it"),
        ("ebpo", {"estimator_options": {"std_normalize": False}}, "set by algorithm.norm_adv_by_std_in_grpo"),
        ("ha_dw", {"estimator_options": {"scale": "batch"}}, "set by algorithm.norm_adv_by_std_in_grpo"),
        ("ebpo_running", {"weighting_options": {"lam": 1.5}}, "has no weighting"),
        ("ebpo_running", {"correctness_threshold": 0.5}, "it would be ignored"),
        ("ha_dw", {"correctness_threshold": "0.5"}, "must be a finite number"),
        ("ha_dw", {"correctness_threshold": float("inf")}, "must be a finite number"),
        ("ebpo_hier", {"topic_key": ""}, "must name a field"),
        ("ebpo", {"estimator_options": [1, 2]}, "must be a mapping"),
        ("ebpo", ["decay"], "must be a mapping of ebpo options"),
    ],
)
def test_bad_options_are_named_at_the_first_call(key, options, message):
    token_rewards, mask, uids, scores, sources = verl_batch(0, (0.0, 1.0))
    config = {"adv_estimator": key, "ebpo": options}
    with pytest.raises(ValueError, match=message):
        adapter.FUNCTIONS[key](token_rewards, mask, index=uids, config=config, data_source=sources, acc=scores > 0)


def test_options_apply_to_the_runs_own_estimator_only():
    """A checkpoint may hold several names: the options of a config naming another estimator are not applied."""
    norm, options = adapter._resolve(
        "ebpo_running", {"adv_estimator": "ebpo_ema", "ebpo": {"estimator_options": {"decay": 0.5}}}
    )
    assert norm and options == adapter.VerlOptions()


# ------------------------------------------------------------------ the batch's fields under verl's two trainers


def stand_in_ray_trainer():
    """verl 0.9.1's ray_trainer.compute_advantage for a registered estimator: the uids and config, nothing else."""

    def compute_advantage(data, adv_estimator, config=None, **_):
        fn = adapter.FUNCTIONS[adv_estimator]
        index = data.non_tensor_batch["uid"]
        advantages, _ = fn(data.batch["token_level_rewards"], data.batch["response_mask"], index=index, config=config)
        return advantages

    return types.SimpleNamespace(__name__="ray_trainer", compute_advantage=compute_advantage)


def install_on_stand_in(v1_trainers=()):
    module = stand_in_ray_trainer()
    adapter.install_batch_forwarding(module, v1_trainers=v1_trainers)
    return module


class TransferQueueStandIn:
    """Per-sample fields by key, as verl's agent loop puts them (uid, data_source, extra_fields, rm_scores ...)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.reads: list[list[str]] = []

    def put(self, keys, rows):
        self.rows.update(zip(keys, rows))

    def get(self, keys, partition_id, fields):
        """Like TransferQueue's kv_batch_get: a field the samples do not have is left out, silently."""
        assert partition_id == "train"
        self.reads.append(list(fields))
        return {f: [self.rows[k][f] for k in keys] for f in fields if f in self.rows[keys[0]]}


class V1TrainerStandIn:
    """verl 0.9.1's v1 PPOTrainer._compute_advantage as ebpo depends on it: it reads only uid, response_mask and
    rm_scores of the batch's keys from TransferQueue, and calls compute_advantage with non_tensor_batch = {uid}."""

    def __init__(self, store, ray_trainer, algorithm):
        self.store, self.ray_trainer = store, ray_trainer
        self.config = types.SimpleNamespace(algorithm=algorithm)

    def _compute_advantage(self, batch, metrics):
        data = self.store.get(batch.keys, batch.partition_id, ["uid", "response_mask", "rm_scores"])
        scores = torch.nn.utils.rnn.pad_sequence(data["rm_scores"], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence(data["response_mask"], batch_first=True).float()
        proto = types.SimpleNamespace(
            batch={"token_level_scores": scores, "token_level_rewards": scores, "response_mask": mask},
            non_tensor_batch={"uid": np.array(data["uid"], dtype=object)},
        )
        algorithm = self.config.algorithm
        return self.ray_trainer.compute_advantage(proto, algorithm["adv_estimator"], config=algorithm)


def put_step(store, step, values, acc_in_extra_info=True):
    """One step's samples in the stand-in TransferQueue; returns the KV batch meta and what the reference needs."""
    token_rewards, mask, uids, scores, sources = verl_batch(step, values)
    keys = [f"{uid}_{i % 4}_0" for i, uid in enumerate(uids)]  # verl's {uid}_{session}_{index}
    lengths = mask.sum(-1).long()
    rows = []
    for i in range(len(keys)):
        info = {"acc": bool(scores[i] > 0)} if acc_in_extra_info else {}
        rows.append(
            {
                "uid": uids[i],
                "data_source": sources[i],
                "extra_fields": {"reward_extra_info": info, "min_global_steps": step},
                "response_mask": mask[i, : lengths[i]],
                "rm_scores": token_rewards[i, : lengths[i]],
            }
        )
    store.put(keys, rows)
    meta = types.SimpleNamespace(keys=keys, partition_id="train")
    return meta, (mask, uids, scores, sources)


@pytest.fixture
def v1(monkeypatch):
    """A fresh v1 trainer stand-in class, hooked; ebpo reads the stand-in TransferQueue."""
    store = TransferQueueStandIn()
    monkeypatch.setattr(adapter, "_tq_get", store.get)
    cls = type("PPOTrainer", (V1TrainerStandIn,), {})
    module = install_on_stand_in(v1_trainers=(cls,))
    assert cls._compute_advantage._ebpo_wrapped is V1TrainerStandIn._compute_advantage
    return store, module, cls


def test_v1_trainer_topics_reach_the_hierarchical_prior(v1):
    """verl's v1 trainer passes no data_source: ebpo reads it from TransferQueue for the batch's keys (3 steps)."""
    store, module, cls = v1
    trainer = cls(store, module, {"adv_estimator": "ebpo_hier_running"})
    reference = build_estimator("ebpo", prior="running", hierarchical=True)
    for step in range(3):
        meta, (mask, uids, scores, sources) = put_step(store, step, (0.0, 1.0))
        advantages = trainer._compute_advantage(meta, {})
        expected, metrics = reference(scores, group_ids(uids), topic_ids=stable_topic_ids(list(sources)))
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)
        assert metrics["ebpo/num_topics"] == 2.0
    assert store.reads[0] == ["uid", "data_source"]  # ebpo's read, then verl's: only what the estimator uses
    assert adapter._BATCH_FIELDS.get() is None


def test_v1_trainer_without_the_hook_refuses_a_hierarchical_name(v1):
    """What verl's v1 trainer alone gives a hierarchical name (no topic): an error, never flat EBPO."""
    store, module, _ = v1
    trainer = V1TrainerStandIn(store, module, {"adv_estimator": "ebpo_hier"})  # the class without the hook
    meta, _ = put_step(store, 0, (0.0, 1.0))
    with pytest.raises(ValueError, match="no 'data_source' field"):
        trainer._compute_advantage(meta, {})


@pytest.mark.parametrize("key", ["ha_dw", "ebpo_ha_dw"])
def test_v1_trainer_acc_from_the_reward_extra_info(v1, key):
    """A -1/1 scorer under the v1 trainer: acc comes from extra_fields["reward_extra_info"] in TransferQueue."""
    store, module, cls = v1
    trainer = cls(store, module, {"adv_estimator": key})
    spec = dict(adapter.SPECS[key])
    reference = build_estimator(spec.pop("name"), **spec)
    for step in range(3):
        meta, (mask, uids, scores, _) = put_step(store, step, (-1.0, 1.0))
        advantages = trainer._compute_advantage(meta, {})
        expected, _ = reference(scores, group_ids(uids), correctness=(scores > 0).double())
        assert torch.allclose(advantages, expected.float().unsqueeze(-1) * mask, atol=1e-6)
    assert store.reads[0] == ["uid", "extra_fields"]
    meta, _ = put_step(store, 5, (-1.0, 1.0), acc_in_extra_info=False)  # a scorer without acc
    with pytest.raises(ValueError, match="no 'acc' in its reward extra info"):
        trainer._compute_advantage(meta, {})
    threshold = cls(store, module, {"adv_estimator": key, "ebpo": {"correctness_threshold": 0.0}})
    reads = len(store.reads)
    threshold._compute_advantage(meta, {})  # from the score: nothing more to read
    assert store.reads[reads:] == [["uid", "response_mask", "rm_scores"]]


def test_v1_trainer_other_estimators_read_nothing_more(v1):
    store, module, cls = v1
    meta, _ = put_step(store, 0, (0.0, 1.0))
    cls(store, module, {"adv_estimator": "ebpo_running"})._compute_advantage(meta, {})
    assert store.reads == [["uid", "response_mask", "rm_scores"]]


def test_v1_trainer_missing_topic_field_is_named(v1):
    store, module, cls = v1
    meta, _ = put_step(store, 0, (0.0, 1.0))
    trainer = cls(store, module, {"adv_estimator": "ebpo_hier", "ebpo": {"topic_key": "subject"}})
    with pytest.raises(ValueError, match=r"TransferQueue have no 'subject' field.*topic_key=COLUMN"):
        trainer._compute_advantage(meta, {})


def test_rows_that_do_not_line_up_are_refused(v1):
    """The fields ebpo read must describe the rows verl passes, uid for uid."""
    store, module, _ = v1

    class Reordering(V1TrainerStandIn):
        def _compute_advantage(self, batch, metrics):  # a verl whose step reorders the rows ebpo read
            reordered = types.SimpleNamespace(keys=batch.keys[::-1], partition_id="train")
            return super()._compute_advantage(reordered, metrics)

    adapter.install_batch_forwarding(module, v1_trainers=(Reordering,))
    meta, _ = put_step(store, 0, (0.0, 1.0))
    with pytest.raises(RuntimeError, match="do not match, row for row"):
        Reordering(store, module, {"adv_estimator": "ebpo_hier"})._compute_advantage(meta, {})


def test_a_v1_trainer_without_the_method_is_named():
    with pytest.raises(RuntimeError, match="_compute_advantage, which this verl does not have"):
        adapter.install_batch_forwarding(stand_in_ray_trainer(), v1_trainers=(type("Renamed", (), {}),))
