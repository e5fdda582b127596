"""Unit tests of the trainer's pieces: config and flags, rollout maths, data stream, gather logic."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerances import LOGPROB_ULPS, assert_close_scale

from ebpo.models import load_policy
from ebpo.sampling import Rollout, completion_mask, generate
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.tasks.build import build_task
from ebpo.train.cli import build_parser, resolve_config
from ebpo.train.config import TrainConfig, field_docs
from ebpo.train.data import PromptStream
from ebpo.train.distributed import Dist
from ebpo.train.presets import PRESETS, list_methods
from ebpo.train.rollout import length_chunks, overlong_penalty, rows_logprobs, sequence_logprobs
from ebpo.train.trainer import group_outcomes


# ---------------------------------------------------------------- config
def test_every_field_is_a_flag_whose_help_is_its_docstring():
    help_text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text
        assert field_docs()[f.name] in help_text


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    parser = build_parser()
    config = resolve_config(parser.parse_args(["--method", "dapo"]))
    assert config.eps_high == 0.28 and config.dynamic_sampling and config.loss_agg == "token-mean"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: dr_grpo\ngroup_size: 6\nlr: 0.01\n")
    config = resolve_config(parser.parse_args(["--config", str(yaml_file), "--lr", "0.5", "--loss-agg", "token-mean"]))
    assert config.method == "dr_grpo" and config.estimator == "dr_grpo"  # preset from the file's method
    assert config.group_size == 6 and config.lr == 0.5 and config.loss_agg == "token-mean"  # flags beat the file


def test_flag_types():
    parser = build_parser()
    config = resolve_config(
        parser.parse_args(
            [
                "--estimator-options",
                "{prior: ema, decay: 0.8}",
                "--divergence",
                "none",
                "--no-tensorboard",
                "--weighting",
                "ha_dw",
            ]
        )
    )
    assert config.estimator_options == {"prior": "ema", "decay": 0.8}
    assert config.divergence is None and config.tensorboard is False and config.weighting == "ha_dw"


def test_presets_cover_the_papers_and_reset_other_methods_components():
    assert set(list_methods()) == {
        "grpo",
        "dr_grpo",
        "dapo",
        "rloo",
        "entropymech",
        "ebpo",
        "ebpo-topic",
        "ebpo-diff",
        "ha_dw",
        "ebpo+ha_dw",
        "gbmpo-probl2",
        "gbmpo-mirror",
    }
    parser = build_parser()
    grpo = resolve_config(parser.parse_args(["--method", "grpo"]))
    assert (
        grpo.divergence is None and grpo.div_coef == 0.0 and grpo.estimator == "grpo"
    )  # no KL leaking from the ebpo default
    assert resolve_config(parser.parse_args(["--method", "ebpo-topic"])).curriculum == "topic"
    for name in PRESETS:
        TrainConfig(**{**dataclasses.asdict(TrainConfig()), **PRESETS[name]})  # every preset names real fields


def test_unknown_yaml_field(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("grop_size: 4\n")
    with pytest.raises(ValueError, match="unknown field\\(s\\) 'grop_size' \\(did you mean 'group_size'\\?\\)"):
        resolve_config(build_parser().parse_args(["--config", str(yaml_file)]))


# ---------------------------------------------------------------- rollout maths
def _mask_oracle(ids: list[list[int]], eos: int) -> list[list[int]]:
    out = []
    for row in ids:
        seen, mask = False, []
        for token in row:
            mask.append(0 if seen else 1)
            seen = seen or token == eos
        out.append(mask)
    return out


def test_completion_mask_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (50, 9), generator=gen)
    assert completion_mask(ids, 2).tolist() == _mask_oracle(ids.tolist(), 2)


def test_overlong_penalty_formula():
    lengths = torch.tensor([3, 6, 7, 8, 10, 10])
    truncated = torch.tensor([False, False, False, False, False, True])
    got = overlong_penalty(lengths, truncated, max_new_tokens=10, buffer=4, penalty=1.0)
    # DAPO eq. 13: 0 up to L_max - L_cache = 6, then (L_max - L_cache - L) / L_cache, -1 when truncated.
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0], dtype=torch.float64))


def test_group_outcomes_against_a_loop():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 1.0], dtype=torch.float64)
    ids = torch.tensor([5, 5, 9, 9, 2, 2, 7, 3, 3, 3])
    got_ids, successes, trials, mixed = group_outcomes(rewards, ids)
    for k, g in enumerate(got_ids.tolist()):
        values = [r for r, i in zip(rewards.tolist(), ids.tolist()) if i == g]
        assert (successes[k].item(), trials[k].item(), bool(mixed[k])) == (
            sum(values),
            len(values),
            len(set(values)) > 1,
        )
    assert got_ids.tolist() == [2, 3, 5, 7, 9]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
    return model, tok


def test_recomputed_logprobs_match_the_sampling_distribution(tiny):
    """Left padding + position ids: the update's log-probs equal generate's own scores."""
    model, tok = tiny
    problems = ArithmeticTask(num_train=10, num_eval=4).eval_problems()
    torch.manual_seed(0)
    rollout = generate(
        model,
        tok,
        problems,
        torch.arange(4),
        group_size=2,
        max_new_tokens=5,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
    )
    assert rollout.input_ids.shape[0] == 8 and rollout.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    logprobs = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)  # (B, T)
    # Oracle: each row alone (no padding at all), token by token with the plain forward pass.
    for row in range(8):
        real = rollout.attention_mask[row, : rollout.prompt_length].bool()
        prompt = rollout.input_ids[row, : rollout.prompt_length][real]
        completion = rollout.input_ids[row, rollout.prompt_length :][rollout.completion_mask[row].bool()]
        full = torch.cat([prompt, completion]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, completion.unsqueeze(1)).squeeze(1)
        got = logprobs[row, : len(completion)]
        assert_close_scale(got, expected, ulps=LOGPROB_ULPS, what=f"row {row}")


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("batch_size", [0, 4])
def test_shared_prompt_cache_samples_what_a_full_prefill_samples(tiny, do_sample, batch_size):
    """Oracle: the same call without the shared cache (every sample prefills its own prompt)."""
    model, tok = tiny
    problems = ArithmeticTask(num_train=10, num_eval=5).eval_problems()  # prompts of different lengths
    outs = []
    for share in (True, False):
        torch.manual_seed(1)
        outs.append(
            generate(
                model,
                tok,
                problems,
                torch.arange(5),
                group_size=3,
                max_new_tokens=6,
                temperature=1.0,
                top_p=1.0,
                do_sample=do_sample,
                chat_template="auto",
                batch_size=batch_size,
                share_prompt_cache=share,
            )
        )
    assert torch.equal(outs[0].input_ids, outs[1].input_ids) and torch.equal(
        outs[0].attention_mask, outs[1].attention_mask
    )
    assert outs[0].texts == outs[1].texts and outs[0].group_ids.tolist() == [i for i in range(5) for _ in range(3)]


def test_length_chunks_cut_padding_without_changing_logprobs(tiny):
    model, tok = tiny
    problems = ArithmeticTask(num_train=10, num_eval=8).eval_problems()
    torch.manual_seed(0)
    rollout = generate(
        model,
        tok,
        problems,
        torch.arange(8),
        group_size=2,
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
    )
    rows = torch.arange(16)
    full = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    chunks = length_chunks(rollout, rows, 0, 4)
    assert sorted(torch.cat(chunks).tolist()) == rows.tolist() and [len(c) for c in chunks] == [4, 4, 4, 4]
    assert [len(c) for c in length_chunks(rollout, rows, 5, 4)] == [5, 5, 5, 1]  # micro_batch_size wins when set
    lengths = [int(rollout.attention_mask[c].sum(1).max()) for c in chunks]
    assert lengths == sorted(lengths) and lengths[0] < rollout.input_ids.shape[1]  # shorter rows first, cut shorter
    mask = rollout.completion_mask.bool()
    for chunk in chunks:
        cut = rows_logprobs(model, rollout, chunk)
        assert cut.shape == (len(chunk), mask.shape[1])
        assert_close_scale(cut[mask[chunk]], full[chunk][mask[chunk]], ulps=LOGPROB_ULPS, what="chunk")
        assert torch.all(cut[~mask[chunk]] == 0)


def test_rollout_concat_keeps_rows_aligned(tiny):
    model, tok = tiny
    task = ArithmeticTask(num_train=10, num_eval=6)
    a = generate(
        model,
        tok,
        task.eval_problems()[:2],
        torch.tensor([0, 1]),
        group_size=2,
        max_new_tokens=3,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
    )
    b = generate(
        model,
        tok,
        task.eval_problems()[2:5],
        torch.tensor([2, 3, 4]),
        group_size=2,
        max_new_tokens=5,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
    )
    both = Rollout.concat([a, b])
    lp_both = sequence_logprobs(model, both.input_ids, both.attention_mask, both.prompt_length)
    lp_a = sequence_logprobs(model, a.input_ids, a.attention_mask, a.prompt_length)
    lp_b = sequence_logprobs(model, b.input_ids, b.attention_mask, b.prompt_length)
    width_a = a.completion_mask.shape[1]
    assert_close_scale(lp_both[:4, :width_a] * a.completion_mask, lp_a * a.completion_mask, ulps=LOGPROB_ULPS)
    assert_close_scale(lp_both[4:] * b.completion_mask, lp_b * b.completion_mask, ulps=LOGPROB_ULPS)
    assert both.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and both.texts == a.texts + b.texts


# ---------------------------------------------------------------- data
def test_stream_position_round_trip_across_epochs():
    problems = ArithmeticTask(num_train=10, num_eval=2).train_problems()
    stream = PromptStream(problems, "shuffle", seed=3)
    first = stream.take(7)
    state = stream.state_dict()
    rest = stream.take(8)  # crosses into epoch 1
    assert len({p.id for p in first + rest[:3]}) == 10  # one epoch is a permutation
    again = PromptStream(problems, "shuffle", seed=3)
    again.load_state_dict(state)
    assert [p.id for p in again.take(8)] == [p.id for p in rest]


def test_task_resolution(monkeypatch):
    from ebpo.tasks.base import TASKS

    assert build_task("arithmetic", {"num_train": 5, "num_eval": 2}).name == "arithmetic"
    assert (
        len(build_task("ebpo.tasks.arithmetic:ArithmeticTask", {"num_train": 5, "num_eval": 2}).train_problems()) == 5
    )
    seen = {}

    def factory(arg, **options):
        seen["arg"], seen["options"] = arg, options
        return ArithmeticTask(num_train=5, num_eval=2)

    monkeypatch.setitem(TASKS._factories, "fake_gym", factory)
    build_task("fake_gym:chain_sum", {"size": 3})
    assert seen == {"arg": "chain_sum", "options": {"size": 3}}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task("nope", {})


# ---------------------------------------------------------------- gather logic
def test_single_process_collectives_are_identities():
    dist = Dist()
    x = torch.arange(5.0)
    assert torch.equal(dist.all_gather_cat(x), x) and dist.local_offset(5) == 0 and dist.sum(2.5) == 2.5


def test_global_advantages_sliced_per_rank_equal_single_process():
    """What every rank does: gather, estimate on the global batch, keep its slice (simulated for 2 ranks)."""
    from ebpo.estimators import build_estimator

    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (24,), generator=gen).double()
    ids = torch.arange(6).repeat_interleave(4)
    shards = [(rewards[:12], ids[:12]), (rewards[12:], ids[12:])]  # rank 0 then rank 1, as all_gather_cat orders them
    single = build_estimator("ebpo", prior="running")
    expected, _ = single(rewards, ids)
    for rank, (r, _) in enumerate(shards):
        est = build_estimator("ebpo", prior="running")
        gathered_r, gathered_i = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
        advantages, _ = est(gathered_r, gathered_i)
        offset = sum(len(s[0]) for s in shards[:rank])
        assert torch.equal(advantages[offset : offset + len(r)], expected[rank * 12 : rank * 12 + 12])
        assert (
            est.state_dict()["estimator_state"]["group_stats"] == single.state_dict()["estimator_state"]["group_stats"]
        )


def test_mirror_params_file_is_the_divergence_the_trainer_builds(tmp_path):
    from ebpo.divergences import NeuralMirror
    from ebpo.train.config import validate
    from ebpo.train.trainer import build_components

    params = torch.rand(NeuralMirror.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    NeuralMirror(params).save(tmp_path / "mirror.json")
    config = resolve_config(
        build_parser().parse_args(["--method", "gbmpo-mirror", "--mirror-params", str(tmp_path / "mirror.json")])
    )
    validate(config)
    divergence = build_components(config).divergence
    assert torch.equal(divergence.flat_params, params)  # not the preset's seed-0 initialisation
    default = build_components(resolve_config(build_parser().parse_args(["--method", "gbmpo-mirror"]))).divergence
    assert not torch.equal(default.flat_params, params)


def test_warm_start_key_depends_on_the_training_problems_not_the_eval_options():
    from ebpo.train.warmstart import train_data_id

    validation_member = ArithmeticTask(num_train=200, eval_seed=424_242, exclude_eval_seeds=(1_000_003,))
    final_run = ArithmeticTask(
        num_train=200, exclude_eval_seeds=(424_242,)
    )  # default held-out set, validation kept out of training
    plain = ArithmeticTask(num_train=200)
    assert validation_member.eval_problems() != final_run.eval_problems()
    assert train_data_id("arithmetic", validation_member.train_problems()) == train_data_id(
        "arithmetic", final_run.train_problems()
    )
    assert train_data_id("arithmetic", plain.train_problems()) != train_data_id(
        "arithmetic", final_run.train_problems()
    )
