"""verl adapter against a real verl (0.9.x): runs where verl is installed (``bash scripts/test-verl.sh``).

The default environment has no verl (its runtime pulls Ray and pins an older transformers), so this file is
skipped there; ``scripts/test-verl.sh`` builds a separate virtual environment with verl and runs it, and
``.ci/run`` calls that script. The worker runs in a subprocess with ``VERL_USE_EXTERNAL_MODULES`` set, i.e.
through the same loading mechanism a verl user's Ray processes use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verl")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "ebpo.integrations.verl_plugin"}
    worker = Path(__file__).with_name("verl_runtime_worker.py")
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp / "r.json"), str(tmp / "m.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp / "r.json").read_text())


def test_external_module_registers_estimators_and_divergences(report):
    assert report["registered"] == [
        "ebpo",
        "ebpo_ema",
        "ebpo_ha_dw",
        "ebpo_hier",
        "ebpo_hier_running",
        "ebpo_running",
        "ha_dw",
    ]
    assert report["losses_module_sees_wrapper"]  # verl's engine-worker loss module calls our kl_penalty


def test_verls_driver_computes_ebpos_advantages(report):
    assert report["advantage_max_abs_diff"] <= 1e-6  # verl's compute_advantage, 3 steps of ebpo_running


def test_ebpo_k3_equals_verls_low_var_kl_in_the_actor_loss(report):
    verl_loss, ours = report["k3_loss"]
    assert ours == pytest.approx(verl_loss, abs=1e-12)
    assert report["k3_kl_logged"][0] == pytest.approx(report["k3_kl_logged"][1], abs=1e-6)
    assert report["k3_grad_max_abs_diff"] <= 1e-12


@pytest.mark.parametrize("name", ["prob_l2", "neural_mirror"])
def test_gbmpo_term_is_coef_times_token_mean_of_the_divergence(report, name):
    added, expected, logged, by_hand = report[name]
    assert added == pytest.approx(expected, rel=1e-9) and added > 0
    assert logged == pytest.approx(by_hand, rel=1e-6)  # verl logs the aggregated term as kl_loss


def test_bad_divergence_spec_is_named(report):
    assert "only ebpo:neural_mirror takes a parameter file" in report["bad_spec_error"]


def test_plugin_hooks_both_of_verls_trainers(report):
    assert report["checkpoints"]["hooked"] == ["PPOTrainer", "RayPPOTrainer"]  # v1 (default) and legacy


def test_resume_through_verls_checkpoints_equals_the_uninterrupted_run(report):
    """verl's own _save_checkpoint / _load_checkpoint (v1 and legacy trainer, auto and resume_path) carry the state."""
    cases = report["checkpoints"]["resume"]
    assert len(cases) == 10
    assert {name.split("/")[2] for name in cases} == {"auto", "resume_path"}
    for name, case in cases.items():
        assert "ebpo_estimator_states.pt" in case["files"] and "data.pt" in case["files"], name  # beside verl's
        assert case["tracker"] == "3" and case["resumed_step"] == 3 and case["actor_loaded"], name
        assert case["max_abs_diff"] == 0.0 and case["state_equal"], name
        assert case["control_max_abs_diff"] > 1e-3, name  # without the restore the same steps differ


def test_resuming_a_checkpoint_without_the_state_is_refused(report):
    assert "ebpo_estimator_states.pt" not in report["checkpoints"]["grpo_files"]  # other estimators write nothing
    assert "EBPO_VERL_FRESH_ESTIMATOR_STATE=1" in report["checkpoints"]["missing_state_error"]


def test_ha_dw_honours_norm_adv_by_std_in_grpo(report):
    assert report["ha_dw_std_off_max_abs_diff"] <= 1e-6  # verl's DictConfig, verl's compute_advantage


@pytest.mark.parametrize("key", ["ebpo_hier_running", "ha_dw", "ebpo_ha_dw"])
def test_v1_trainers_advantage_step_gives_ebpo_the_batchs_topics_and_acc(report, key):
    """verl's v1 PPOTrainer._compute_advantage reads only uid, masks and scores: ebpo reads the topic (hierarchical
    names) or the reward extra info's acc (HA-DW, with a -1/1 scorer) of the same samples; 3 steps equal the core."""
    case = report["v1"][key]
    assert case["max_abs_diff"] <= 1e-6 and case["state_equal"]
    assert case["reads"] == ["uid", "data_source" if key.startswith("ebpo_hier") else "extra_fields"]
    assert "PPOTrainer._compute_advantage" in report["v1"]["hooked"] and report["v1"]["v1_utils_wrapped"]


def test_v1_trainer_alone_gives_a_hierarchical_name_no_topic_and_it_refuses(report):
    """What verl's own step hands ebpo_hier (no data_source): an error naming the fix, never flat EBPO."""
    assert "no 'data_source' field" in report["v1"]["unhooked_hier_error"]


def test_hadw_without_acc_or_threshold_refuses_at_the_first_step(report):
    assert "correctness_threshold=T" in report["v1"]["no_acc_error"]


@pytest.mark.parametrize("key", ["ebpo_ema", "ha_dw"])
def test_options_on_verls_command_line_reach_the_estimator(report, key):
    """+algorithm.ebpo.* through hydra (verl's launcher) and verl's compute_advantage: decay, lam, threshold."""
    assert report["options"][key]["max_abs_diff"] <= 1e-6


def test_an_unknown_option_is_named(report):
    assert "decayy" in report["options"]["typo_error"]
