"""Fixtures shared by the test files: the tiny policy, a trainer on a small batch, and the full-forward oracle.

Helpers that several test files use live here (as fixtures), not in one test
file that the others import. Tolerance assertions are in ``tolerances.py``,
independent loop references in ``oracles.py``.
"""

from __future__ import annotations

import copy
import os

# MKL (torch's CPU BLAS) picks its kernels by CPU and memory alignment unless told to be reproducible: on some
# CPUs (seen on AMD EPYC) two processes given the same inputs then differ by about one float32 ulp, and the tests
# that check a resumed run against the uninterrupted one bit for bit fail for that reason alone. Its conditional
# numerical reproducibility mode keeps the fast kernels and removes the dependence; read when MKL first runs, so
# set before torch is imported (the processes tests launch inherit it). A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM

# The trainer on the small built-in arithmetic task, no warm start: each test's own flags come after these.
TRAINER_ARGS = [
    "--task",
    "arithmetic",
    "--warmstart-steps",
    "0",
    "--task-options",
    "{num_train: 64, num_eval: 8, max_terms: 1, max_digits: 2}",
    "--prompts-per-step",
    "4",
    "--group-size",
    "4",
    "--max-new-tokens",
    "6",
    "--no-progress",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--no-tensorboard",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """One warm-start cache per test session, never the user's ~/.cache (tests may set their own)."""
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ebpo-cache"))


@pytest.fixture(scope="module")
def tiny():
    """The built-in tiny Llama and its character tokenizer, on the CPU, seed 0."""
    from ebpo.models import load_policy

    return load_policy("builtin:tiny", device=torch.device("cpu"), seed=0)


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(*flags, echo=...)``: a Trainer on ``TRAINER_ARGS`` + flags, in a new run folder of tmp_path."""
    from ebpo.train.cli import build_parser, resolve_config
    from ebpo.train.trainer import Trainer, build_components

    def make(*flags, echo=lambda _: None):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        config = resolve_config(build_parser().parse_args(["--out", str(out), *TRAINER_ARGS, *flags]))
        return Trainer(config, str(out), build_components(config), resume=False, echo=echo)

    return make


def _synthetic_batch(trainer, seed=0):
    rollout, _, _, _ = trainer.rollout_and_score()
    gen = torch.Generator().manual_seed(seed)
    return rollout, torch.randn(len(rollout.texts), generator=gen)


@pytest.fixture
def synthetic_batch():
    """``synthetic_batch(trainer, seed=0)``: one rollout of the trainer's policy and N(0, 1) advantages per
    response, so every path has a signal."""
    return _synthetic_batch


def _full_forward(model, rollout, temperature):
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


@pytest.fixture
def full_forward():
    """``full_forward(model, rollout, temperature) -> (logprobs, entropies)``, both (B, T): the oracle for the
    trainer's completion log-probs (no ``logits_to_keep``, no shared prompt, no cache)."""
    return _full_forward


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


def _policy_of_kind(model, kind):
    if kind == "no_logits_to_keep":
        plain = _NoLogitsToKeep(model.config)
        plain.load_state_dict(model.state_dict())
        model = plain.eval()
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


@pytest.fixture
def policy_of_kind():
    """``policy_of_kind(model, kind) -> (model, what the code under test calls)`` for each kind of policy the
    trainer meets: ``hf``, ``no_logits_to_keep``, ``wrapped`` (DDP/FSDP-like), ``lora``."""
    return _policy_of_kind
