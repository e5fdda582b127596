"""The code verifier: correct programs pass; hostile programs get 0 within the limit and leave the host intact."""

from __future__ import annotations

import json
import os
import time

import pytest

from ebpo.verifiers import build_verifier

MBPP = json.dumps({"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
HUMANEVAL = json.dumps({"test": "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n", "entry_point": "sort_list"})
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def verifier():
    return build_verifier("code", timeout_seconds=TIMEOUT)


def test_correct_solutions_pass(verifier):
    assert verifier("```python\ndef add(a, b):\n    return a + b\n```", MBPP).reward == 1.0
    assert verifier("def sort_list(xs):\n    return sorted(xs)", HUMANEVAL).reward == 1.0
    assert verifier("add = lambda a, b: a + b", "assert add(2, 2) == 4").reward == 1.0  # plain assert lines
    assert verifier("def add(a, b):\n    return a - b", MBPP).info == {"failed": 1.0}


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    return path


def hostile_programs(sentinel):
    return {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "fork bomb via libc": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()",
        "10 GB allocation": "blob = bytearray(10 * 1024 ** 3)",
        "delete a host file": f"import os\nos.remove({str(sentinel)!r})",
        "overwrite a host file": f"open({str(sentinel)!r}, 'w').write('pwned')",
        "write outside the workdir": f"open({str(sentinel.parent / 'new.txt')!r}, 'w').write('x')",
        "network connection": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "raw network connection": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', 22))",
        "1 GB of output": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))",
    }


@pytest.mark.parametrize("case", list(hostile_programs(__import__("pathlib").Path("/x")).keys()))
def test_hostile_code_gets_zero_within_the_limit_and_the_host_is_intact(verifier, sentinel, case):
    program = hostile_programs(sentinel)[case] + "\ndef add(a, b):\n    return a + b\n"
    start = time.monotonic()
    result = verifier(program, MBPP)
    assert time.monotonic() - start < TIMEOUT + 2
    assert result.reward == 0.0
    assert sentinel.read_text() == "keep me"
    assert not (sentinel.parent / "new.txt").exists()


def test_sandbox_layers_active_here(verifier):
    if os.geteuid() == 0:  # CI and this machine run as root: every layer must be on
        assert verifier.user is not None and verifier.isolate_network
