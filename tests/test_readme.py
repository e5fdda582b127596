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
    assert run_command.endswith("ebpo train") and "torch==2.13.0" in run_command
    pytest_part = test_command.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci.splitlines(), f"{pytest_part!r} must be a line of .ci/run"


def test_component_example_runs():
    section = README.split("## Using the components", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["advantages"].shape == (8,)
    assert namespace["advantages"][:4].lt(0).all()  # the all-failure group is pushed down (EBPO)
    assert "ebpo/shrinkage" in namespace["metrics"]
