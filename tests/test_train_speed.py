"""The training step's hot path: the same maths with less work.

* the LM head runs only on the positions that predict completion tokens
  (``logits_to_keep``), with a full-forward fallback for models without it;
* metrics stay on the device and are read back once per step;
* group ids stay on the CPU, where the estimator runs.

Each optimisation is checked against the plain computation it replaces.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import LOGPROB_ULPS, assert_close_scale

from ebpo.sampling import generate
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.train.rollout import _keeps_logits, rows_logprobs, sequence_logprobs


@pytest.fixture(scope="module")
def rollout(tiny):
    model, tok = tiny
    problems = ArithmeticTask(num_train=10, num_eval=6).eval_problems()  # prompts of different lengths
    torch.manual_seed(0)
    return generate(
        model,
        tok,
        problems,
        torch.arange(6),
        group_size=2,
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        do_sample=True,
        chat_template="auto",
        batch_size=0,
    )


def _head_widths(model):
    """Record the sequence length of every input of the LM head."""
    widths = []
    head = model.get_output_embeddings()
    return widths, head.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["hf", "no_logits_to_keep", "wrapped", "lora"])
def test_completion_logprobs_equal_the_full_forward_and_skip_prompt_logits(
    tiny, rollout, kind, temperature, policy_of_kind, full_forward
):
    model, call = policy_of_kind(tiny[0], kind)
    assert _keeps_logits(call) == (kind != "no_logits_to_keep")
    expected, expected_entropy = full_forward(call, rollout, temperature)
    mask = rollout.completion_mask.bool()
    rows = torch.arange(len(rollout.texts))
    widths, hook = _head_widths(model)
    try:
        with torch.no_grad():
            got, entropy = rows_logprobs(call, rollout, rows, temperature, entropy=True)
            whole = sequence_logprobs(
                call, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, temperature
            )
    finally:
        hook.remove()
    assert_close_scale(got[mask], expected[mask], ulps=LOGPROB_ULPS, what="log-probs")
    assert_close_scale(entropy[mask], expected_entropy[mask], ulps=LOGPROB_ULPS, what="entropies")
    assert_close_scale(whole[mask], expected[mask], ulps=LOGPROB_ULPS, what="sequence log-probs")
    T = int(rollout.completion_mask.sum(1).max())
    full = rollout.input_ids.shape[1]
    if kind == "no_logits_to_keep":
        assert widths[0] > T + 1  # the fallback: the full forward, sliced
    else:  # the head saw only the T + 1 last positions (the last one predicts nothing and is dropped)
        assert widths == [T + 1, full - rollout.prompt_length + 1], widths


def test_group_ids_stay_on_the_cpu(rollout):
    assert rollout.group_ids.device.type == "cpu" and rollout.group_ids.tolist() == [
        i for i in range(6) for _ in range(2)
    ]


def test_row_lengths_are_the_masks_counts(rollout):
    prompt, completion = rollout.row_lengths()
    assert prompt.tolist() == rollout.attention_mask[:, : rollout.prompt_length].sum(1).tolist()
    assert completion.tolist() == rollout.completion_mask.sum(1).tolist()


def _count_host_reads(monkeypatch):
    """Count ebpo's own reads of floating-point or boolean tensor values into Python (each a device sync on a GPU).

    Integer reads are not counted: the update reads only CPU index tensors (row lengths) that way. Reads made
    by torch or transformers code (the optimiser, attention-mask checks) are not ebpo's and are not counted.
    """
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__import__("ebpo").__file__)))
    counter = {"n": 0}
    for name in ("__float__", "__bool__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if (self.dtype.is_floating_point or self.dtype == torch.bool) and caller.startswith(package):
                counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def test_update_reads_metrics_back_once_per_step_not_per_micro_batch(make_trainer, synthetic_batch, monkeypatch):
    """Before: ~12 reads (float() of every metric, checks, maxima) per micro-batch. Now: one finiteness check per
    micro-batch (it must raise before backward) and, per step, one read of every metric and the gradient norm."""
    counts = {}
    for micro in (0, 2):  # one micro-batch (16 rows, length_buckets 1) vs eight of 2 rows
        trainer = make_trainer("--method", "grpo", "--micro-batch-size", str(micro), "--length-buckets", "1")
        batch, advantages = synthetic_batch(trainer)
        with monkeypatch.context() as patch:
            counter = _count_host_reads(patch)
            metrics = trainer.update(batch, advantages)
        counts[micro] = counter["n"]
        assert all(isinstance(v, float) for v in metrics.values())
    assert counts[2] - counts[0] == 7, counts  # 8 micro-batches vs 1: one finiteness check each
    assert counts[0] <= 3, counts
