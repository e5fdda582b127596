"""The update runs each group's prompt once: same log-probs, entropies and gradients as the full forward.

Oracle: the plain full forward over every row (prompt and completion), sliced
to the completion positions, and autograd through it.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import GRADIENT_ULPS, LOGPROB_ULPS, UPDATE_ULPS, assert_close_norm, assert_close_scale

from ebpo.sampling import Rollout, generate
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.train.rollout import distinct_prompts, length_chunks, rows_logprobs


@pytest.fixture(scope="module")
def rollout(tiny):
    """Two rounds of 3 prompts x G = 3, concatenated (re-padded) as DAPO's resampling does: prompts of different lengths."""
    model, tok = tiny
    problems = ArithmeticTask(num_train=10, num_eval=6).eval_problems()
    torch.manual_seed(0)
    parts = [
        generate(
            model,
            tok,
            problems[3 * k : 3 * k + 3],
            torch.arange(3) + 3 * k,
            group_size=3,
            max_new_tokens=5 + 2 * k,
            temperature=1.0,
            top_p=1.0,
            do_sample=True,
            chat_template="auto",
            batch_size=0,
        )
        for k in range(2)
    ]
    return Rollout.concat(parts)


def _embedded_rows(model):
    """Record the (rows, width) of every input of the token embedding."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))
    )
    return shapes, hook


def test_rows_of_a_group_share_their_prompt_tokens_and_padding(rollout):
    """The invariant the shared forward relies on, for generate's rollouts and their concatenation."""
    P = rollout.prompt_length
    heads, inverse = distinct_prompts(rollout.group_ids)
    assert heads.numel() == 6 and torch.equal(rollout.group_ids[heads][inverse], rollout.group_ids)
    assert torch.equal(rollout.input_ids[heads][inverse][:, :P], rollout.input_ids[:, :P])
    assert torch.equal(rollout.attention_mask[heads][inverse][:, :P], rollout.attention_mask[:, :P])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["hf", "no_logits_to_keep", "wrapped", "lora"])
def test_shared_prompt_logprobs_equal_the_full_forward_and_run_each_prompt_once(
    tiny, rollout, kind, temperature, policy_of_kind, full_forward
):
    model, call = policy_of_kind(tiny[0], kind)
    expected, expected_entropy = full_forward(call, rollout, temperature)
    mask = rollout.completion_mask.bool()
    rows = torch.arange(len(rollout.texts))
    shapes, hook = _embedded_rows(model)
    try:
        with torch.no_grad():
            got, entropy = rows_logprobs(call, rollout, rows, temperature, entropy=True, share_prompts=True)
    finally:
        hook.remove()
    assert_close_scale(got[mask], expected[mask], ulps=LOGPROB_ULPS, what="log-probs")
    assert_close_scale(entropy[mask], expected_entropy[mask], ulps=LOGPROB_ULPS, what="entropies")
    # pass 1: the 6 distinct prompts; pass 2: the 18 rows' completion tokens
    T = int(rollout.completion_mask.sum(1).max())
    assert shapes == [(6, rollout.prompt_length), (18, T)], shapes


def test_a_micro_batch_that_splits_groups_and_rows_in_any_order(tiny, rollout, full_forward):
    model, _ = tiny
    expected, _ = full_forward(model, rollout, 1.0)
    for rows in (
        torch.tensor([7, 0, 4, 1, 12]),
        torch.tensor([16, 3]),
    ):  # groups 2, 0, 1, 0, 4 (one shared); 5, 1 (none)
        with torch.no_grad():
            got = rows_logprobs(model, rollout, rows, share_prompts=True)
        mask = rollout.completion_mask[rows].bool()
        assert_close_scale(got[mask], expected[rows][mask], ulps=LOGPROB_ULPS, what=f"rows {rows.tolist()}")
    one = torch.tensor([4])  # a single row, cut to its own completion length (a 1-token completion must work too)
    with torch.no_grad():
        shared_row = rows_logprobs(model, rollout, one, share_prompts=True)
        assert_close_scale(shared_row, rows_logprobs(model, rollout, one), ulps=LOGPROB_ULPS, what="one row")


def test_gradients_equal_the_full_forwards(tiny, rollout):
    """The shared prompt positions receive the gradient of all G rows, as in the full forward."""
    model, _ = tiny
    mask = rollout.completion_mask.float()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    rows = torch.arange(len(rollout.texts))
    grads = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        (rows_logprobs(model, rollout, rows, 0.8, share_prompts=share) * weights).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for name, grad in grads[False].items():
        # Norm-relative: the G rows' prompt gradients are summed in another order than the full forward's, so
        # small elements differ by more than their own rtol while the tensor agrees to float32 rounding.
        assert_close_norm(grads[True][name], grad, ulps=GRADIENT_ULPS, what=name)
    assert any(g.abs().sum() > 0 for n, g in grads[True].items() if "embed" in n)  # the prompt tokens' embeddings learn


@pytest.mark.parametrize("size,chunks", [(0, 3), (4, 0), (0, 1)])
def test_length_chunks_keep_groups_together(rollout, size, chunks):
    rows = torch.randperm(18, generator=torch.Generator().manual_seed(1))
    micros = length_chunks(rollout, rows, size, chunks, whole_groups=True)
    order = torch.cat(micros)
    assert sorted(order.tolist()) == list(range(18))  # every row exactly once
    groups = rollout.group_ids[order].tolist()
    runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert len(runs) == 6  # each group's rows are adjacent
    lengths = (rollout.attention_mask.sum(1))[order]
    longest = [max(lengths[[i for i, g in enumerate(groups) if g == run]].tolist()) for run in runs]
    assert longest == sorted(longest)  # groups ordered by their longest row


@pytest.mark.parametrize(
    "flags",
    [[], ["--micro-batch-size", "3"], ["--ppo-epochs", "2", "--mini-batches", "2"]],
    ids=["buckets", "micro3", "ppo"],
)
def test_the_update_with_shared_prompts_equals_the_update_without(make_trainer, synthetic_batch, flags):
    """Same rollout, same advantages: the policy after an update (and its metrics) agree with sharing on and off."""
    results = []
    for share in (True, False):
        trainer = make_trainer(
            "--method",
            "grpo",
            "--seed",
            "3",
            "--share-prompt-cache" if share else "--no-share-prompt-cache",
            *flags,
        )
        assert trainer.share_update_prompts == share
        torch.manual_seed(5)
        batch, advantages = synthetic_batch(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        metrics = trainer.update(batch, advantages)
        results.append(({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}, metrics))
    (shared, shared_metrics), (plain, plain_metrics) = results
    # The updates, norm-relative per tensor: AdamW's first step is about lr * sign(gradient), so a gradient
    # element at rounding level can flip its step; the tensor's update agrees to a small fraction of its size.
    for name, update in plain.items():
        assert_close_norm(shared[name], update, ulps=UPDATE_ULPS, what=name)
    for key in ("loss/policy", "policy/entropy", "optim/grad_norm"):
        assert shared_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-6), key


def test_fsdp_runs_do_not_share_prompts_in_the_update():
    """Two forwards of an FSDP wrapper before one backward are not verified here: FSDP keeps the full-row forward."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ebpo.train.distributed import Dist

    assert Dist(accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP)).shards_parameters
    assert not Dist(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)).shards_parameters
    assert not Dist().shards_parameters


def test_synced_sampling_makes_every_ranks_number_of_calls_and_is_otherwise_the_same(tiny, monkeypatch):
    """Under FSDP (``sync``) each model call is a collective: a process makes the maximum number of
    ``generate`` calls over processes (idle ones on a one-token prompt), all with ``synced_gpus``, and no
    separate prompt prefill; its own samples are those of an unsynced run without the prefill."""
    model, tokenizer = tiny
    problems = ArithmeticTask(num_train=8, num_eval=2, max_terms=1, max_digits=2, seed=0).train_problems()[:3]
    calls = []
    real = type(model).generate

    def counting(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].shape, kwargs.get("synced_gpus")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counting)
    import socket

    import torch.distributed as torch_dist

    with socket.socket() as sock:  # synced_gpus all-reduces a flag each token: a (one-process) group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _check_synced_sampling(model, tokenizer, problems, calls)
    finally:
        torch_dist.destroy_process_group()


def _check_synced_sampling(model, tokenizer, problems, calls) -> None:
    common = dict(group_size=2, max_new_tokens=4, temperature=1.0, top_p=1.0, do_sample=False, chat_template="auto")
    plain = generate(model, tokenizer, problems, torch.arange(3), batch_size=4, share_prompt_cache=False, **common)
    assert [synced for _, synced in calls] == [None, None]  # 3 problems, 2 a call
    calls.clear()
    asked = []
    synced = generate(
        model, tokenizer, problems, torch.arange(3), batch_size=4, sync=lambda n: asked.append(n) or 5, **common
    )
    assert asked == [2] and len(calls) == 5 and all(flag is True for _, flag in calls)
    assert [tuple(shape) for shape, _ in calls[2:]] == [(1, 1)] * 3  # the idle calls
    assert torch.equal(synced.input_ids, plain.input_ids) and synced.texts == plain.texts
    calls.clear()
    idle = generate(model, tokenizer, [], torch.arange(0), batch_size=4, sync=lambda n: 2, **common)
    assert len(calls) == 2 and idle.input_ids.shape[0] == 0 and idle.texts == []
    with pytest.raises(ValueError, match="no problems"):
        generate(model, tokenizer, [], torch.arange(0), batch_size=4, **common)
