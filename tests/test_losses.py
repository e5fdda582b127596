"""Policy losses and aggregation against a per-token loop oracle, sharding invariance, EntropyMech selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpo.divergences import build_divergence
from ebpo.losses import LossInputs, build_policy_loss, list_aggregations, list_policy_losses

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def random_inputs(seed: int, b: int = 6, t: int = 9, per_token_adv: bool = False, ref: bool = False) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp_max(0.0)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[0] = t  # at least one full sequence; lengths may be 0
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()
    adv_shape = (b, t) if per_token_adv else (b,)
    advantages = torch.randn(*adv_shape, generator=gen, dtype=torch.float64)
    ref_logprobs = (old + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp_max(0.0) if ref else None
    return LossInputs(logprobs.requires_grad_(), old, advantages, mask, ref_logprobs)


def loop_loss(
    inputs: LossInputs, mode: str, eps_low: float, eps_high: float, constant: float = 12.0, div=None, coef=0.0
) -> float:
    b, t = inputs.logprobs.shape
    per_seq, all_tokens = [], []
    for i in range(b):
        terms = []
        for j in range(t):
            if inputs.mask[i, j] == 0:
                continue
            a = float(inputs.advantages[i, j] if inputs.advantages.dim() == 2 else inputs.advantages[i])
            ratio = math.exp(float(inputs.logprobs[i, j]) - float(inputs.old_logprobs[i, j]))
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            term = -min(ratio * a, clipped * a)
            if div is not None:
                term += coef * float(
                    div(inputs.logprobs[i, j].detach().view(1, 1), inputs.ref_logprobs[i, j].view(1, 1))
                )
            terms.append(term)
        all_tokens += terms
        per_seq.append(terms)
    if mode == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) if s else 0.0 for s in per_seq) / b
    if mode == "seq-mean-token-sum":
        return sum(sum(s) for s in per_seq) / b
    return sum(sum(s) / constant for s in per_seq) / b


def test_registries():
    assert list_policy_losses() == ["clip", "clip_cov", "kl_cov"]
    assert list_aggregations() == sorted(MODES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_clip_matches_loop_oracle(mode, seed, per_token_adv):
    inputs = random_inputs(seed, per_token_adv=per_token_adv)
    loss_fn = build_policy_loss("clip", eps_low=0.2, eps_high=0.28, agg=mode, agg_constant=12.0)
    out = loss_fn(inputs)
    assert float(out.loss) == pytest.approx(loop_loss(inputs, mode, 0.2, 0.28), abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name,options", [("kl", {"estimator": "k3"}), ("prob_l2", {}), ("neural_mirror", {"init_scale": 1.0})]
)
def test_divergence_added_per_token_before_aggregation(mode, name, options):
    inputs = random_inputs(11, ref=True)
    div = build_divergence(name, **options)
    out = build_policy_loss("clip", agg=mode, agg_constant=12.0, divergence=div, div_coef=0.3)(inputs)
    assert float(out.loss) == pytest.approx(loop_loss(inputs, mode, 0.2, 0.2, div=div, coef=0.3), abs=1e-10)
    assert out.metrics["loss/divergence"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_sharded_loss_with_global_counts_equals_unsharded(mode):
    inputs = random_inputs(3, b=8)
    loss_fn = build_policy_loss("clip", agg=mode, agg_constant=12.0)
    full = loss_fn(inputs).loss
    num_tokens, num_seqs = float(inputs.mask.sum()), 8.0
    shards = [slice(0, 3), slice(3, 8)]
    total = sum(
        loss_fn(
            LossInputs(inputs.logprobs[s], inputs.old_logprobs[s], inputs.advantages[s], inputs.mask[s]),
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        ).loss
        for s in shards
    )
    if mode == "seq-mean-token-mean" or mode.startswith("seq-mean-token-sum") or mode == "token-mean":
        assert float(total) == pytest.approx(float(full), abs=1e-12)
    # without the global count, token-mean on uneven shards is NOT the global mean
    if mode == "token-mean":
        naive = (
            sum(
                loss_fn(
                    LossInputs(inputs.logprobs[s], inputs.old_logprobs[s], inputs.advantages[s], inputs.mask[s])
                ).loss
                for s in shards
            )
            / 2
        )
        assert abs(float(naive) - float(full)) > 1e-6


def test_clip_fractions_and_clip_higher_gradient():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 0.7 (A<0: low clip binds), 1.25 (A>0: inside 1+0.28 but outside 1+0.2), 1.5 (A>0: high clip binds), 1.0
    logprobs = torch.log(torch.tensor([[0.7, 1.25, 1.5, 1.0]], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([[-1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    symmetric = build_policy_loss("clip", eps_low=0.2, eps_high=0.2)(LossInputs(logprobs, old, advantages, mask))
    assert symmetric.metrics["loss/clip_frac_low"] == 0.25
    assert symmetric.metrics["loss/clip_frac_high"] == 0.5
    symmetric.loss.backward()
    assert float(logprobs.grad[0, 1]) == 0.0  # clipped at 1.2: no gradient
    logprobs.grad = None
    higher = build_policy_loss("clip", eps_low=0.2, eps_high=0.28)(LossInputs(logprobs, old, advantages, mask))
    assert higher.metrics["loss/clip_frac_high"] == 0.25
    higher.loss.backward()
    assert float(logprobs.grad[0, 1]) == pytest.approx(-1.25 / 4)  # d(-r A)/dlogp = -r A, token-mean over 4
    assert float(logprobs.grad[0, 2]) == 0.0


def _cov(inputs: LossInputs) -> torch.Tensor:
    m = inputs.mask
    adv = inputs.advantages.unsqueeze(-1).expand_as(m) if inputs.advantages.dim() == 1 else inputs.advantages
    adv_mean = (adv * m).sum() / m.sum()
    lp = inputs.logprobs.detach()
    lp_mean = (lp * m).sum() / m.sum()
    return (adv - adv_mean) * (lp - lp_mean)


def test_clip_cov_detaches_the_expected_number_of_band_tokens():
    inputs = random_inputs(5, b=20, t=30, per_token_adv=True)
    options = dict(clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=50.0)
    gen = torch.Generator().manual_seed(0)
    out = build_policy_loss("clip_cov", generator=gen, **options)(inputs)
    out.loss.backward()
    grad = inputs.logprobs.grad
    n_valid = int(inputs.mask.sum())
    expected = max(1, int(0.05 * n_valid))
    # tokens whose gradient was removed: valid tokens at exactly 0 gradient that the clip did not zero
    detached = (grad == 0) & (inputs.mask > 0)
    band = (_cov(inputs) > 0.0) & (_cov(inputs) < 50.0) & (inputs.mask > 0)
    ratio = (inputs.logprobs.detach() - inputs.old_logprobs).exp()
    adv = inputs.advantages
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    chosen = detached & ~clipped
    assert int(chosen.sum()) == expected
    assert bool(band[chosen].all())
    assert out.metrics["loss/entropymech_frac"] == pytest.approx(expected / n_valid)
    # reproducible with the same seed
    again = build_policy_loss("clip_cov", generator=torch.Generator().manual_seed(0), **options)(inputs)
    assert float(again.loss) == float(out.loss)


def test_kl_cov_penalises_the_top_k_covariance_tokens():
    inputs = random_inputs(8, b=10, t=12, per_token_adv=True)
    ratio = 0.1
    out = build_policy_loss("kl_cov", kl_cov_ratio=ratio, kl_coef=2.0)(inputs)
    cov = _cov(inputs)
    valid = [(float(cov[i, j]), i, j) for i in range(10) for j in range(12) if inputs.mask[i, j] > 0]
    k = max(1, int(ratio * len(valid)))
    top = {(i, j) for _, i, j in sorted(valid, reverse=True)[:k]}
    expected_terms = []
    for _, i, j in valid:
        r = math.exp(float(inputs.logprobs[i, j]) - float(inputs.old_logprobs[i, j]))
        term = -float(inputs.advantages[i, j]) * r  # no clipping in KL-Cov
        if (i, j) in top:
            term += 2.0 * abs(float(inputs.logprobs[i, j]) - float(inputs.old_logprobs[i, j]))
        expected_terms.append(term)
    assert float(out.loss) == pytest.approx(sum(expected_terms) / len(expected_terms), abs=1e-12)


def test_errors():
    inputs = random_inputs(0)
    with pytest.raises(ValueError, match="no ref_logprobs"):
        build_policy_loss("clip", divergence=build_divergence("prob_l2"), div_coef=0.1)(inputs)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        build_policy_loss("clip", agg="sum")
    with pytest.raises(ValueError, match="agg_constant"):
        build_policy_loss("clip", agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="advantages must be"):
        build_policy_loss("clip")(LossInputs(inputs.logprobs, inputs.old_logprobs, torch.zeros(3), inputs.mask))
    bad = inputs.advantages.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN"):
        build_policy_loss("clip")(LossInputs(inputs.logprobs, inputs.old_logprobs, bad, inputs.mask))
    with pytest.raises(ValueError, match="unknown policy loss"):
        build_policy_loss("ppo2")


def test_empty_sequences_and_empty_mask_are_finite():
    inputs = random_inputs(1)
    empty = LossInputs(inputs.logprobs, inputs.old_logprobs, inputs.advantages, torch.zeros_like(inputs.mask))
    for mode in MODES:
        out = build_policy_loss("clip", agg=mode, agg_constant=5.0)(empty)
        assert float(out.loss) == 0.0
        assert all(math.isfinite(v) for v in out.metrics.values())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-30, 0), min_size=6, max_size=6),
    st.lists(st.floats(-30, 0), min_size=6, max_size=6),
    st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2),
    st.sampled_from(MODES),
    st.sampled_from(["clip", "clip_cov", "kl_cov"]),
)
def test_fuzz_finite_inputs_give_finite_loss_and_grads(lp, old, adv, mode, name):
    logprobs = torch.tensor(lp, dtype=torch.float64).view(2, 3).requires_grad_()
    inputs = LossInputs(
        logprobs,
        torch.tensor(old, dtype=torch.float64).view(2, 3),
        torch.tensor(adv, dtype=torch.float64),
        torch.ones(2, 3, dtype=torch.float64),
        logprobs.detach() - 0.1,
    )
    out = build_policy_loss(name, agg=mode, agg_constant=3.0, divergence=build_divergence("prob_l2"), div_coef=0.1)(
        inputs
    )
    out.loss.backward()
    assert math.isfinite(float(out.loss)) and bool(torch.isfinite(logprobs.grad).all())
