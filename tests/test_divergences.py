"""Divergences: non-negativity, zero on the diagonal, gradients, the neural mirror map against an integral oracle."""

from __future__ import annotations

import math

import pytest
import torch

from ebpo.divergences import NUM_PARAMS, NeuralMirror, build_divergence, list_divergences

GRID = torch.cat([torch.logspace(-6, 0, 25, dtype=torch.float64), torch.linspace(0.05, 0.95, 19, dtype=torch.float64)])
P, P_REF = torch.meshgrid(GRID, GRID, indexing="ij")  # every (p, p_ref) pair in (0, 1]

NONNEG = [
    ("kl", {"estimator": "k2"}),
    ("kl", {"estimator": "k3"}),
    ("prob_l2", {}),
    ("log_l2", {}),
    ("neural_mirror", {"seed": 0}),
    ("neural_mirror", {"seed": 1, "init_scale": 1.0}),
]


def test_registry():
    assert list_divergences() == ["kl", "log_l2", "neural_mirror", "prob_l2"]
    with pytest.raises(ValueError, match="unknown divergence"):
        build_divergence("js")
    with pytest.raises(ValueError, match="estimator must be one of"):
        build_divergence("kl", estimator="k4")


@pytest.mark.parametrize("name,options", NONNEG)
def test_non_negative_and_zero_on_diagonal(name, options):
    div = build_divergence(name, **options)
    values = div(P.log(), P_REF.log())
    assert bool((values >= 0).all()), float(values.min())
    diagonal = div(GRID.log(), GRID.log())
    assert float(diagonal.abs().max()) <= 1e-12


def test_k1_is_unbiased_for_kl_but_not_pointwise_non_negative():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(8, generator=gen, dtype=torch.float64), 0)
    k1 = build_divergence("kl", estimator="k1")(p.log(), q.log())
    assert float(k1.min()) < 0
    exact_kl = float((p * (p / q).log()).sum())
    assert float((p * k1).sum()) == pytest.approx(exact_kl, rel=1e-12)  # E_p[k1] = KL(p || q) >= 0
    k3 = build_divergence("kl", estimator="k3")(p.log(), q.log())
    assert float((p * k3).sum()) == pytest.approx(exact_kl, rel=1e-12)  # k3 is unbiased too


@pytest.mark.parametrize("name,options", NONNEG + [("kl", {"estimator": "k1"})])
def test_autograd_matches_finite_differences(name, options):
    div = build_divergence(name, **options)
    logp = torch.log(torch.tensor([[0.02, 0.3, 0.7], [0.5, 0.9, 0.1]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.1, 0.3, 0.2], [0.6, 0.4, 0.05]], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: div(x, ref), (logp,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,options", [("prob_l2", {}), ("neural_mirror", {"seed": 0, "init_scale": 1.0})])
def test_bregman_gradient_closed_form(name, options):
    """dD/dlog p = p (h'(p) - h'(p_ref)) for a Bregman divergence D_h(p, p_ref)."""
    div = build_divergence(name, **options)
    h_prime = (lambda y: 2 * y) if name == "prob_l2" else div.h_prime
    logp = P.log().clone().requires_grad_()
    div(logp, P_REF.log()).sum().backward()
    expected = P * (h_prime(P) - h_prime(P_REF))
    assert torch.allclose(logp.grad, expected, rtol=1e-8, atol=1e-10)


def test_prob_l2_gradient_bounded_while_k3_explodes():
    p, p_ref = torch.tensor([1e-8], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    grads = {}
    for name, options in [("prob_l2", {}), ("kl", {"estimator": "k3"})]:
        logp = p.log().requires_grad_()
        build_divergence(name, **options)(logp, p_ref.log()).sum().backward()
        grads[name] = float(logp.grad)
    assert abs(grads["prob_l2"]) <= 2 * 1e-8 * 0.5 + 1e-15  # |2 (p - p_ref) p| <= 2p
    assert grads["kl"] == pytest.approx(1 - 0.5 / 1e-8)  # 1 - p_ref / p = -5e7
    # over the whole grid ProbL2's gradient never exceeds 2 in magnitude
    logp = P.log().clone().requires_grad_()
    build_divergence("prob_l2")(logp, P_REF.log()).sum().backward()
    assert float(logp.grad.abs().max()) <= 2.0


def _mirror_oracle(params: torch.Tensor, y: float, y0: float) -> float:
    """D_h(y, y0) = integral_{y0}^{y} (h'(t) - h'(y0)) dt, Simpson's rule, units one by one."""
    v, w, b = params[:126].tolist(), params[126:252].tolist(), params[252:378].tolist()
    a, c = float(params[378]), float(params[379])
    acts = [
        lambda x: x**3,
        lambda x: x**2,
        lambda x: math.sqrt(max(x, 0.0)),
        lambda x: max(x, 0.0) ** (1 / 3),
        lambda x: math.log(max(x, 0.0) + 1e-3),
        math.exp,
    ]

    def h_prime(t: float) -> float:
        total = a * t + c * math.log(t)
        for j in range(126):
            total += v[j] * acts[j // 21](w[j] * t + b[j])
        return total

    n = 2000
    step = (y - y0) / n
    base = h_prime(y0)
    ts = [y0 + i * step for i in range(n + 1)]
    f = [h_prime(t) - base for t in ts]
    return step / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("project", [True, False])
def test_neural_mirror_matches_integral_oracle(project):
    gen = torch.Generator().manual_seed(5)
    params = torch.rand(NUM_PARAMS, generator=gen, dtype=torch.float64)
    if not project:
        params = params - 0.3  # negative entries exercise the clamped-activation branches
    params[:21] = 0.0  # cube units off: their v = 0
    params[126:130] = 0.0  # w = 0: the Taylor branch
    mirror = NeuralMirror(params, project_nonneg=project)
    pairs = [(0.3, 0.7), (0.9, 0.05), (0.5, 0.5001), (1.0, 0.2), (0.01, 0.02)]
    got = mirror(
        torch.tensor([math.log(y) for y, _ in pairs], dtype=torch.float64),
        torch.tensor([math.log(y0) for _, y0 in pairs], dtype=torch.float64),
    )
    for (y, y0), value in zip(pairs, got.tolist()):
        assert value == pytest.approx(_mirror_oracle(mirror.flat_params, y, y0), rel=1e-6, abs=1e-9)


def test_negative_parameters_can_break_non_negativity():
    params = torch.zeros(NUM_PARAMS, dtype=torch.float64)
    params[21] = -5.0  # v < 0 on a square unit: h'' = 2 v w^2 < 0, h concave
    params[126 + 21] = 1.0
    unprojected = NeuralMirror(params, project_nonneg=False)
    assert float(unprojected(P.log(), P_REF.log()).min()) < 0
    projected = NeuralMirror(params)  # clamps v to 0: convex again
    assert float(projected(P.log(), P_REF.log()).min()) >= 0


def test_flat_parameter_and_file_round_trip(tmp_path):
    mirror = NeuralMirror(seed=3, init_scale=0.5)
    x, ref = torch.log(torch.rand(4, 6, dtype=torch.float64)), torch.log(torch.rand(4, 6, dtype=torch.float64))
    assert torch.equal(mirror.with_params(mirror.flat_params)(x, ref), mirror(x, ref))
    mirror.save(tmp_path / "phi.json")
    loaded = build_divergence("neural_mirror", params_path=str(tmp_path / "phi.json"))
    assert torch.equal(loaded.flat_params, mirror.flat_params)
    assert torch.equal(loaded(x, ref), mirror(x, ref))
    assert mirror.flat_params.shape == (380,)
    assert bool(((mirror.flat_params >= 0) & (mirror.flat_params <= 0.5)).all())  # U(0, init_scale)


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        build_divergence("prob_l2")(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="380 parameters"):
        NeuralMirror(torch.zeros(10))
    with pytest.raises(ValueError, match="cannot read"):
        build_divergence("neural_mirror", params_path="/no/such/file.json")


def test_float32_output_dtype_and_non_negativity():
    mirror = NeuralMirror(seed=0)
    out = mirror(P.log().float(), P_REF.log().float())
    assert out.dtype == torch.float32 and bool((out >= 0).all())


# ---------------------------------------------------------------- values and exact non-negativity


def test_k2_and_log_l2_values_against_closed_forms():
    """k2 = (log p_ref - log p)^2 / 2 and log_l2 = (log p - log p_ref)^2, at hand-computed points."""
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9, 0.25], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.25, 0.4, 0.9, 0.5], dtype=torch.float64))
    ln2, ln4 = math.log(2.0), math.log(4.0)
    expected_sq = torch.tensor([ln2**2, ln4**2, 0.0, ln2**2], dtype=torch.float64)  # (log(p / p_ref))^2
    k2 = build_divergence("kl", estimator="k2")(logp, ref)
    log_l2 = build_divergence("log_l2")(logp, ref)
    assert torch.allclose(k2, expected_sq / 2, rtol=1e-14, atol=0)
    assert torch.allclose(log_l2, expected_sq, rtol=1e-14, atol=0)
    # k2's gradient w.r.t. log p is -(log p_ref - log p) = log(p / p_ref)
    logp_g = logp.clone().requires_grad_()
    build_divergence("kl", estimator="k2")(logp_g, ref).sum().backward()
    assert torch.allclose(logp_g.grad, logp - ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,init_scale", [(0, 0.01), (1, 1.0), (2, 0.1)])
def test_neural_mirror_is_non_negative_next_to_the_diagonal(dtype, seed, init_scale):
    """D_h >= 0 exactly (convex h) on a dense grid of (p, p_ref) pairs a relative 1e-12 .. 1e-3 apart."""
    div = NeuralMirror(seed=seed, init_scale=init_scale)
    base = torch.cat(
        [torch.logspace(-8, 0, 80, dtype=torch.float64), torch.linspace(0.01, 0.99, 80, dtype=torch.float64)]
    )
    rel = torch.cat(
        [-torch.logspace(-12, -3, 40, dtype=torch.float64), torch.logspace(-12, -3, 40, dtype=torch.float64)]
    )
    ref = base.log().unsqueeze(1).expand(-1, rel.numel())  # (160, 80)
    logp = (ref + rel.unsqueeze(0)).clamp_max(0.0)
    values = div(logp.to(dtype), ref.to(dtype))
    assert values.dtype == dtype
    assert float(values.min()) >= 0.0, float(values.min())
