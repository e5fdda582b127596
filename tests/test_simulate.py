"""ebpo simulate: the HA-DW table and bias, EBPO's baseline MSE, zero learning signal, the bandit and the CLI.

Monte Carlo tolerances are 4 standard errors computed from the simulation
itself (a false failure about 1 time in 16,000 per check), never hand-tuned.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpo.estimators import build_estimator
from ebpo.simulate import main
from ebpo.simulate.bandit import BANDIT_ESTIMATORS, BanditConfig, init_logits, reinforce_gradient, run_bandit
from ebpo.simulate.baselines import EBPO_PRIORS, baseline_mse, zero_signal
from ebpo.simulate.populations import parse_dist, sample_rewards
from ebpo.simulate.theory import (
    bias_closed_form,
    bias_mc,
    ebpo_population_shrinkage,
    hadw_probability_exact,
    hadw_probability_given_p,
    hadw_probability_mc,
    hadw_probability_pooled,
    oracle_shrinkage,
    shrinkage_mse_given_p,
    shrinkage_mse_population,
)

PAPER = {0.25: {2: 1.0, 4: 1.0, 6: 0.8278, 8: 0.7811}, 0.5: {2: 1.0, 4: 0.7770, 6: 0.6897, 8: 0.6409}}


# ------------------------------------------------------------------ HA-DW table


def _table_by_loops(g: int, upper: float, points: int = 20_000) -> float:
    """Independent oracle: a plain loop over k with math.comb, midpoint rule over p (no shared code)."""
    h = upper / points
    ps = (torch.arange(points, dtype=torch.float64) + 0.5) * h
    above = torch.zeros(points, dtype=torch.float64)
    mixed = torch.zeros(points, dtype=torch.float64)
    for k in range(1, g):
        term = math.comb(g, k) * ps**k * (1 - ps) ** (g - k)
        mixed += term
        above += term * (k / g > ps)
    return float((above / mixed).mean())


@pytest.mark.parametrize("upper", [0.25, 0.5])
@pytest.mark.parametrize("g", [2, 4, 6, 8])
def test_hadw_table_reproduces_the_paper(upper, g):
    exact = hadw_probability_exact(g, upper)
    assert abs(exact - PAPER[upper][g]) < 5e-5  # the paper's 4 printed decimals, not only 3
    assert exact == pytest.approx(_table_by_loops(g, upper), abs=2e-4)  # midpoint error at the jumps ~ h
    assert hadw_probability_exact(g, upper, nodes=16) == pytest.approx(exact, abs=1e-12)  # quadrature converged


@pytest.mark.parametrize("upper,g", [(0.25, 6), (0.25, 8), (0.5, 4), (0.5, 8), (0.5, 2)])
def test_hadw_table_monte_carlo_agrees_within_four_standard_errors(upper, g):
    mc = hadw_probability_mc(g, upper, 100_000, torch.Generator().manual_seed(g))
    assert mc["unresolved"] <= 5  # p below ~1e-5 only
    assert (
        abs(mc["estimate"] - hadw_probability_exact(g, upper)) < 4 * mc["std_error"] + mc["unresolved"] / mc["samples"]
    )


def test_the_pooled_reading_does_not_give_the_papers_figures():
    """The paper averages the conditional probability over p; pooling over p gives other numbers."""
    assert hadw_probability_pooled(6, 0.25) == pytest.approx(0.7455, abs=1e-4)
    assert abs(hadw_probability_pooled(6, 0.25) - PAPER[0.25][6]) > 0.05
    assert hadw_probability_pooled(4, 0.25) == pytest.approx(
        1.0, abs=1e-12
    )  # where every mixed mu_hat >= 1/4 > p both readings agree


def test_conditional_probability_given_p_is_one_below_one_over_g():
    p = torch.tensor([0.01, 0.1, 0.24], dtype=torch.float64)
    assert torch.allclose(hadw_probability_given_p(4, p), torch.ones(3, dtype=torch.float64))
    # G = 6 at p = 0.2: mixed groups with k = 1 (mu_hat = 1/6 < 0.2) are the only ones below
    q = 0.8
    k1 = 6 * 0.2 * q**5
    assert float(hadw_probability_given_p(6, torch.tensor([0.2], dtype=torch.float64))) == pytest.approx(
        1 - k1 / (1 - q**6 - 0.2**6), abs=1e-12
    )


# ------------------------------------------------------------------ bias curve


@pytest.mark.parametrize("g", [2, 3, 4, 8])
def test_bias_closed_form_matches_the_binomial_sum_and_monte_carlo(g):
    p = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    closed = bias_closed_form(g, p)
    by_sum = torch.tensor(
        [
            sum(math.comb(g, k) * x**k * (1 - x) ** (g - k) * k / g for k in range(1, g)) / (1 - (1 - x) ** g - x**g)
            - x
            for x in p.tolist()
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(closed, by_sum, atol=1e-12)
    mc = bias_mc(g, p, 50_000, torch.Generator().manual_seed(g))
    assert bool(((mc["bias"] - closed).abs() <= 4 * mc["std_error"] + 1e-12).all())
    # The paper's finding: mu_hat over-estimates p below 0.5 and under-estimates it above; unbiased at 0.5.
    assert bool((closed[:3] > 0).all()) and bool((closed[4:] < 0).all()) and abs(float(closed[3])) < 1e-12
    assert torch.allclose(bias_closed_form(g, 1 - p), -closed, atol=1e-12)  # symmetry p <-> 1 - p


def test_bias_for_g2_is_half_minus_p():
    p = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert torch.allclose(bias_closed_form(2, p), 0.5 - p, atol=1e-12)  # a mixed pair always has mu_hat = 1/2


def test_bias_rejects_p_at_the_boundary():
    with pytest.raises(ValueError, match="0 < p < 1"):
        bias_closed_form(4, torch.tensor([0.0, 0.5]))


# ------------------------------------------------------------------ populations and closed-form MSE


def test_population_moments_are_exact_and_match_samples():
    beta = parse_dist("beta:2,2")
    assert (beta.mean, beta.var, beta.noise) == pytest.approx((0.5, 0.05, 0.2), abs=1e-12)
    mix = parse_dist("mix:0.5*beta:1,5+0.5*beta:5,1")
    uni = parse_dist("uniform:0,0.5")
    assert uni.var == pytest.approx(0.25 / 12, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    for pop in (beta, mix, uni):
        theta = pop.sample(200_000, gen)
        assert 0.0 <= float(theta.min()) and float(theta.max()) <= 1.0
        se_mean, se_var = (
            math.sqrt(pop.var / 200_000),
            math.sqrt(2 / 200_000) * pop.var * 1.5,
        )  # var s.e. with a kurtosis margin
        assert float(theta.mean()) == pytest.approx(pop.mean, abs=4 * se_mean)
        assert float(theta.var()) == pytest.approx(pop.var, abs=4 * se_var)


@pytest.mark.parametrize(
    "spec",
    [
        "gauss:0,1",
        "beta:0,1",
        "beta:1",
        "uniform:0.5,0.2",
        "mix:beta:1,1",
        "mix:0.5*beta:1,1",
        "mix:-1*beta:1,1+1*beta:2,2",
        "beta:a,b",
    ],
)
def test_bad_distribution_specs_raise(spec):
    with pytest.raises(ValueError):
        parse_dist(spec)


def test_oracle_shrinkage_is_the_beta_posterior_mean_and_closed_forms_agree():
    for a, b, g in [(2, 2, 4), (1, 3, 2), (5, 1, 8)]:
        pop = parse_dist(f"beta:{a},{b}")
        s = oracle_shrinkage(pop, g)
        assert s == pytest.approx((a + b) / (g + a + b), abs=1e-12)  # (k + a)/(G + a + b) = (1-S) k/G + S a/(a+b)
        # The population MSE is the Beta average of the MSE given p (numerical integral, independent of the closed form).
        p = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
        density = torch.distributions.Beta(float(a), float(b)).log_prob(p).exp()
        for shrink in (0.0, s, ebpo_population_shrinkage(pop, g)):
            integral = float((density * shrinkage_mse_given_p(g, p, shrink, pop.mean)).sum() / density.sum())
            assert shrinkage_mse_population(pop, g, shrink, pop.mean) == pytest.approx(integral, rel=1e-4)
        # The oracle is the best shrinkage factor toward the mean.
        grid = [shrinkage_mse_population(pop, g, x, pop.mean) for x in torch.linspace(0, 1, 101).tolist()]
        assert shrinkage_mse_population(pop, g, s, pop.mean) <= min(grid) + 1e-12


def test_ebpo_baseline_mse_is_about_half_of_the_group_mean():
    """Beta(2,2), G = 4, 512 prompts per batch: paper 0.050 (group mean), 0.026 (EBPO), 0.025 (oracle)."""
    pop = parse_dist("beta:2,2")
    mse = baseline_mse(pop, 4, 512, 24, torch.Generator().manual_seed(0))
    mean, se, closed = mse["mean"], mse["std_error"], mse["closed_form"]
    for name in ("group mean", "leave-one-out", "oracle shrinkage"):
        assert abs(mean[name] - closed[name]) < 4 * se[name], name
    assert closed["group mean"] == pytest.approx(0.050, abs=1e-12) and closed["oracle shrinkage"] == pytest.approx(
        0.025, abs=1e-12
    )
    assert closed["ebpo (large-batch limit)"] == pytest.approx(0.0263, abs=1e-4)  # the paper's ~0.026
    for prior in EBPO_PRIORS:
        # 512 prompts estimate S with ~1% relative error: a finite-batch excess far below one standard error.
        assert abs(mean[prior] - closed["ebpo (large-batch limit)"]) < 4 * se[prior], prior
        assert abs(mean[prior] - 0.026) < 0.002  # the paper's figure, to its printed precision
        assert 0.45 < mean[prior] / mean["group mean"] < 0.6  # "about half"
        assert mse["shrinkage"][prior] == pytest.approx(mse["shrinkage"]["ebpo (large-batch limit)"], abs=0.01)
    # Per-bin curves: the group mean's MSE follows p(1-p)/G (bins far from the edges, where counts are large).
    bins = mse["bins"]
    centres = torch.tensor([(a + b) / 2 for a, b in zip(bins["edges"][:-1], bins["edges"][1:])], dtype=torch.float64)
    inner = slice(6, 14)
    expected = shrinkage_mse_given_p(4, centres[inner], 0.0, 0.5)
    assert torch.allclose(torch.tensor(bins["group mean"][inner], dtype=torch.float64), expected, rtol=0.15)


# ------------------------------------------------------------------ zero learning signal


def test_zero_signal_table():
    table = zero_signal(parse_dist("beta:1,3"), 4, 256, 6, torch.Generator().manual_seed(1))
    rows = table["estimators"]
    for label in ("ebpo-batch", "ebpo-running", "ebpo-ema", "ebpo+ha_dw"):
        assert rows[label]["zero_signal_frac"] == 0.0
        assert rows[label]["all_failure_nonneg_frac"] == 0.0  # every all-failure response is pushed down
        assert rows[label]["all_failure_adv_mean"] < 0 and rows[label]["raw_all_failure_adv"] < 0
    for label in ("grpo", "dr_grpo", "rloo", "ha_dw"):
        assert rows[label]["all_failure_adv_mean"] == 0.0 and rows[label]["all_failure_nonneg_frac"] == 1.0
        # zero signal exactly on all-equal groups: E[theta^G + (1-theta)^G] (binomial s.e. of 6 x 256 groups)
        se = math.sqrt(0.25 / (6 * 256))
        assert abs(rows[label]["zero_signal_frac"] - table["all_equal_frac_expected"]) < 4 * se


@settings(max_examples=40, deadline=None)
@given(
    prior=st.sampled_from(sorted(EBPO_PRIORS)),
    g=st.integers(2, 6),
    warmup=st.lists(st.lists(st.integers(0, 1), min_size=12, max_size=12), max_size=3),
    groups=st.lists(st.integers(0, 6), min_size=2, max_size=8),
)
def test_ebpo_never_gives_an_all_failure_group_a_zero_advantage(prior, g, warmup, groups):
    """Any prior, any history: if the batch has one success, every all-failure response gets A < 0.

    With centring, the all-failure advantage is -S * (batch mean reward) / std (docs/methods.md#all-failure-groups), so
    it is zero only for a batch with no success at all, which the test excludes by construction.
    """
    estimator = build_estimator("ebpo", **EBPO_PRIORS[prior])
    for rewards in warmup:  # a history for the running and EMA priors (groups of 3)
        estimator(torch.tensor(rewards, dtype=torch.float64), torch.arange(4).repeat_interleave(3))
    successes = [min(k, g) for k in groups]
    successes[0] = 0  # one all-failure group
    successes[-1] = max(successes[-1], 1)  # and one success in the batch
    rewards = torch.tensor([[1.0] * k + [0.0] * (g - k) for k in successes], dtype=torch.float64)  # (M, G)
    advantages, _ = estimator(rewards.reshape(-1), torch.arange(len(successes)).repeat_interleave(g))
    failed = (rewards.sum(1) == 0).repeat_interleave(g)
    assert bool((advantages[failed] < 0).all())


def test_with_centring_the_prior_mean_cancels_out_of_the_advantage():
    """docs/simulate.md §3: with center=True and equal G, A_centred = r - (1 - S) mu_q - S * ybar (no mu_glob)."""
    estimator = build_estimator("ebpo", prior="running", std_normalize=False)
    history = torch.tensor([1.0, 1.0, 1.0, 0.0] * 6, dtype=torch.float64)  # mean 0.75
    estimator(history, torch.arange(6).repeat_interleave(4))
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float64)  # ybar = 0.25
    advantages, metrics = estimator(rewards, torch.arange(3).repeat_interleave(4))
    s, ybar = metrics["ebpo/shrinkage"], float(rewards.mean())
    assert abs(metrics["ebpo/mu_glob"] - ybar) > 0.3  # the prior mean is far from this batch's mean
    group_mean = rewards.view(3, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(advantages, rewards - (1 - s) * group_mean - s * ybar, atol=1e-12)


# ------------------------------------------------------------------ softmax bandit


def test_init_logits_hit_the_target_success_rates():
    theta = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
    logits = init_logits(theta, 8, 1.5, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.softmax(logits, 1)[:, 0], theta, atol=1e-12)


def test_reinforce_gradient_matches_autograd_per_prompt():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    answers = torch.randint(0, 6, (5, 3), generator=gen)
    advantages = torch.randn(15, generator=gen, dtype=torch.float64)
    got = reinforce_gradient(torch.softmax(logits, 1), answers, advantages)
    for q in range(5):  # slow reference: autograd of (1/G) sum_i A_i log pi(a_i), one prompt at a time
        z = logits[q].clone().requires_grad_(True)
        objective = sum(advantages[3 * q + i] * torch.log_softmax(z, 0)[answers[q, i]] for i in range(3)) / 3
        objective.backward()
        assert torch.allclose(got[q], z.grad, atol=1e-12)


def test_bandit_learns_and_rms_updates_remove_a_constant_advantage_scale():
    pop = parse_dist("beta:1,3")
    config = BanditConfig(group_size=4, prompts=128, batch=32, steps=40, update="rms")
    runs = {
        label: run_bandit(BANDIT_ESTIMATORS[label], pop, config, seed=3) for label in ("dr_grpo", "rloo", "ebpo-batch")
    }
    for run in runs.values():
        assert len(run["success"]) == 41 and all(math.isfinite(x) for x in run["success"] + run["entropy"])
        assert 0.0 <= min(run["entropy"]) and max(run["entropy"]) <= math.log(8) + 1e-12
        assert run["success"][-1] > run["success"][0] + 0.05  # it learns
        assert run["entropy"][-1] < run["entropy"][0]
    # RLOO's advantage is G/(G-1) times Dr. GRPO's: after RMS scaling the two runs are the same run.
    assert runs["rloo"]["success"] == pytest.approx(runs["dr_grpo"]["success"], abs=1e-9)
    sgd = run_bandit(
        BANDIT_ESTIMATORS["rloo"], pop, BanditConfig(group_size=4, prompts=128, batch=32, steps=40), seed=3
    )
    assert sgd["success"][-1] != pytest.approx(runs["rloo"]["success"][-1], abs=1e-6)


def test_bandit_config_validates():
    with pytest.raises(ValueError, match="group size"):
        BanditConfig(group_size=1)
    with pytest.raises(ValueError, match="update"):
        BanditConfig(update="adam")


# ------------------------------------------------------------------ CLI


def test_cli_quick_writes_report_plots_and_json(tmp_path):
    out, data = tmp_path / "sim", tmp_path / "sim.json"
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(out), "--json", str(data)]) == 0
    assert torch.get_num_threads() == threads  # main restores the thread count it lowers
    for name in (
        "report.md",
        "hadw.png",
        "mse_vs_p.png",
        "mse_vs_g.png",
        "zero_signal.png",
        "bandit_sgd.png",
        "bandit_rms.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    result = json.loads(data.read_text())
    assert result["hadw_table"]["0.25"]["6"]["exact"] == pytest.approx(0.8278, abs=5e-5)
    assert set(result["mse"]) == {"2", "4", "8", "16", "32"}
    for update in ("sgd", "rms"):
        for g in ("2", "4"):
            for label, entry in result["bandit"][update][g].items():
                curve = entry["success"]["mean"]
                assert len(curve) == 61 and all(0.0 <= x <= 1.0 for x in curve), label
                assert all(math.isfinite(x) for x in entry["entropy"]["mean"] + entry["success"]["ci_half_width"]), (
                    label
                )
    report = (out / "report.md").read_text()
    assert "0.8278" in report and "0.7770" in report and "ebpo+ha_dw" in report


def test_cli_passes_hadw_options_and_subsets(tmp_path):
    data = tmp_path / "a.json"
    argv = [
        "--quick",
        "--group-sizes",
        "4",
        "--bandit-group-sizes",
        "2",
        "--bandit-updates",
        "rms",
        "--bandit-steps",
        "5",
    ]
    argv += [
        "--bandit-seeds",
        "2",
        "--hadw-anchor",
        "hard",
        "--hadw-lam",
        "1.5",
        "--out",
        str(tmp_path / "o"),
        "--json",
        str(data),
    ]
    assert main(argv) == 0
    result = json.loads(data.read_text())
    assert (
        result["config"]["hadw_anchor"] == "hard"
        and set(result["bandit"]) == {"rms"}
        and set(result["bandit"]["rms"]) == {"2"}
    )
    assert len(result["bandit"]["rms"]["2"]["ha_dw"]["success"]["mean"]) == 6
    assert not (tmp_path / "o" / "bandit_sgd.png").exists() and (tmp_path / "o" / "bandit_rms.png").exists()


def test_populations_docstring_examples():
    import doctest

    import ebpo.simulate.populations

    result = doctest.testmod(ebpo.simulate.populations)
    assert result.attempted > 0 and result.failed == 0


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--dist", "gauss:0,1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown distribution" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--group-sizes", "1", "4", "--out", str(tmp_path)])


def test_sample_rewards_shapes_and_rates():
    theta = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)
    rewards, group_ids = sample_rewards(theta, 20_000, torch.Generator().manual_seed(0))
    per_prompt = rewards.view(3, -1).mean(1)
    assert (
        per_prompt[0] == 0.0 and per_prompt[1] == 1.0 and abs(float(per_prompt[2]) - 0.3) < 4 * math.sqrt(0.21 / 20_000)
    )
    assert group_ids.tolist()[:2] == [0, 0] and group_ids.tolist()[-1] == 2
