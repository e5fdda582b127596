"""The README's four routes run: each file in examples/ as a user runs it (a subprocess), the offline variant.

``from_trl.py --tiny`` trains 2 steps of the built-in tiny model; ``from_verl.py`` needs verl, which the main
environment does not have (it pins an older transformers and pulls Ray): it is skipped here and run by
``scripts/test-verl.sh`` in that script's environment. The CPU playground route is ``ebpo train``, whose
README commands ``test_readme.py`` checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/NAME`` with this interpreter in ``cwd`` (offline, one thread); its stdout, or a failure."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # the offline variants download nothing
        "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{name} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_as_library(tmp_path):
    out = run_example("as_library.py", cwd=tmp_path)
    assert "resumed == continued: True | fresh == continued: False" in out  # the state round trip
    assert "adv/all_equal_group_frac = 0.667" in out  # 2 of the 3 toy groups are all-equal
    assert "running_mean/baseline = 0.500" in out  # the plugin estimator ran through the registry
    assert out.rstrip().endswith("ok")


def test_from_trl_tiny(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = run_example("from_trl.py", "--tiny", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    # The one-line import switched the trainer to EBPO with its default per-batch prior.
    assert "estimator: ebpo (prior=batch)" in out
    assert "steps: 2" in out
    logged = re.findall(
        r"^step (\d+): reward ([\d.]+), adv/all_equal_group_frac ([\d.]+), ebpo/shrinkage ([\d.]+)$", out, re.M
    )
    assert [int(step) for step, *_ in logged] == [1, 2]  # ebpo's metrics reached TRL's log every step
    for _, reward, frac, shrinkage in logged:
        assert 0.0 <= float(reward) <= 1.0 and 0.0 <= float(frac) <= 1.0 and 0.0 <= float(shrinkage) <= 1.0


def test_from_verl(tmp_path):
    pytest.importorskip("verl")  # scripts/test-verl.sh's environment
    out = run_example("from_verl.py", cwd=tmp_path)
    registered = "ebpo, ebpo_ema, ebpo_ha_dw, ebpo_hier, ebpo_hier_running, ebpo_running, ha_dw"
    assert f"ebpo estimators registered in verl: {registered}" in out
    assert "config: adv_estimator=ebpo_running, rollout.n=4, kl_loss_type=ebpo:prob_l2" in out
    assert out.rstrip().endswith("ok")


def test_the_readme_verl_route_names_every_registered_estimator():
    """The verl route lists every name the plugin registers (an older README listed 5 of 7) and the topic key."""
    from ebpo.integrations.verl import SPECS

    readme = (EXAMPLES.parent / "README.md").read_text()
    route = readme.split("\n## From verl\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", route))
    assert set(SPECS) <= named, f"README's From verl does not name {sorted(set(SPECS) - named)}"
    assert "EBPO_VERL_TOPIC_KEY" in route
    guide = (EXAMPLES.parent / "docs" / "guide.md").read_text()
    for name in SPECS:  # the option map has a row for each
        assert f"`{name}`" in guide or f"adv_estimator={name}`" in guide, name
