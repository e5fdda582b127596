"""``run_parallel``: exit codes per job, logs captured, per-job wall time reported."""

from __future__ import annotations

import sys

from ebpo.train.procs import run_parallel


def test_exit_codes_logs_and_per_job_seconds(tmp_path):
    jobs = [
        ("slow", [sys.executable, "-c", "import time; time.sleep(2); print('slow done')"], tmp_path / "slow.log"),
        ("fails", [sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], tmp_path / "fails.log"),
    ]
    seen: dict[str, float] = {}
    codes = run_parallel(jobs, workers=1, on_done=lambda name, code, seconds: seen.__setitem__(name, seconds))
    assert codes == {"slow": 0, "fails": 3}
    assert (tmp_path / "slow.log").read_text().strip() == "slow done"
    assert (tmp_path / "fails.log").read_text().strip() == "bad"
    # workers=1: "fails" starts after "slow" ends; its own time excludes the 2 s it waited.
    assert seen["slow"] >= 2.0
    assert seen["fails"] < seen["slow"]
