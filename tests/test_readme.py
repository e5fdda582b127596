"""The README's promises: the quick-start commands match .ci/run, and its component example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.DOTALL)
    assert len(blocks) == 2, "the quick start has exactly two commands: run the main job, run the tests"
    run_command, test_command = (b.strip() for b in blocks)
    assert run_command.endswith("ebpo train")
    for command in (run_command, test_command):  # both install the locked versions the figures were measured with
        assert "-c requirements/lock.txt" in command, command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} must be a line of .ci/run"


def test_the_lock_pins_the_cpu_torch_and_every_package_once():
    lines = [line for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines() if not line.startswith("#")]
    names = [line.split("==")[0].lower() for line in lines]
    assert all("==" in line for line in lines) and len(names) == len(set(names))
    assert "torch==2.13.0" in lines  # the README's CPU pin (an unpinned torch may pull a multi-GB CUDA build)


def test_component_example_runs():
    section = README.split("## Using the components", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["advantages"].shape == (8,)
    assert namespace["advantages"][:4].lt(0).all()  # the all-failure group is pushed down (EBPO)
    assert "ebpo/shrinkage" in namespace["metrics"]
