"""The training step's hot path (issue 14): the same maths with less work.

* the LM head runs only on the positions that predict completion tokens
  (``logits_to_keep``), with a full-forward fallback for models without it;
* metrics stay on the device and are read back once per step;
* group ids stay on the CPU, where the estimator runs.

Each optimisation is checked against the plain computation it replaces.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from ebpo.models import load_policy
from ebpo.sampling import generate
from ebpo.tasks.arithmetic import ArithmeticTask
from ebpo.train.rollout import _keeps_logits, rows_logprobs, sequence_logprobs


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)
    return model, tok


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


def _oracle(model, rollout, temperature):
    """Log-probs and entropies (B, T) from the full forward: every position's logits, sliced afterwards."""
    P = rollout.prompt_length
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions
        ).logits
    logits = logits[:, P - 1 : -1].float() / temperature  # (B, T, V)
    logp = torch.log_softmax(logits, -1)
    chosen = logp.gather(2, rollout.input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    return chosen, -(logp.exp() * logp).sum(-1)


def _head_widths(model):
    """Record the sequence length of every input of the LM head."""
    widths = []
    head = model.get_output_embeddings()
    return widths, head.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))


class _NoLogitsToKeep(LlamaForCausalLM):
    """A causal LM whose forward does not take ``logits_to_keep`` (older or custom models)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        assert "logits_to_keep" not in kwargs
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs
        )


class _Wrapper(torch.nn.Module):
    """Stands for DDP/FSDP: the model under ``.module``, calls forwarded."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def _plain(model):
    other = _NoLogitsToKeep(model.config)
    other.load_state_dict(model.state_dict())
    return other.eval()


def model_of_kind(model, kind):
    """(the model, what the code under test calls) for each kind of policy the trainer meets."""
    if kind == "no_logits_to_keep":
        model = _plain(model)
    elif kind == "lora":
        pytest.importorskip("peft")
        from ebpo.models.loading import add_lora

        torch.manual_seed(0)
        model = add_lora(copy.deepcopy(model), 4)
        with torch.no_grad():  # non-zero adapters, so the adapted model differs from the base
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model, (_Wrapper(model) if kind == "wrapped" else model)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["hf", "no_logits_to_keep", "wrapped", "lora"])
def test_completion_logprobs_equal_the_full_forward_and_skip_prompt_logits(tiny, rollout, kind, temperature):
    model, call = model_of_kind(tiny[0], kind)
    assert _keeps_logits(call) == (kind != "no_logits_to_keep")
    expected, expected_entropy = _oracle(call, rollout, temperature)
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
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], expected_entropy[mask], atol=1e-5)
    assert torch.allclose(whole[mask], expected[mask], atol=1e-5)
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


def test_update_reads_metrics_back_once_per_step_not_per_micro_batch(tmp_path, monkeypatch):
    """Before: ~12 reads (float() of every metric, checks, maxima) per micro-batch. Now: one finiteness check per
    micro-batch (it must raise before backward) and, per step, one read of every metric and the gradient norm."""
    from test_train_correctness import _batch, _trainer

    counts = {}
    for micro in (0, 2):  # one micro-batch (16 rows, length_buckets 1) vs eight of 2 rows
        trainer = _trainer(tmp_path, "--method", "grpo", "--micro-batch-size", str(micro), "--length-buckets", "1")
        batch, advantages = _batch(trainer)
        with monkeypatch.context() as patch:
            counter = _count_host_reads(patch)
            metrics = trainer.update(batch, advantages)
        counts[micro] = counter["n"]
        assert all(isinstance(v, float) for v in metrics.values())
    assert counts[2] - counts[0] == 7, counts  # 8 micro-batches vs 1: one finiteness check each
    assert counts[0] <= 3, counts
