"""Red team: hostile completions against the code verifier (corpus in ``redteam_corpus.py``).

Each attack is a non-solution. For each one: the reward is 0.0; the canary file and
its (world-writable) directory are untouched and nothing appears in the host's
world-writable directories; no process of the check outlives it; listeners on
127.0.0.1 receive nothing; the call returns within ``timeout + grace``. Run under
the default sandbox (every layer this machine allows) and, as root, under the OS
layers alone (no audit hook), since each must hold on its own. Where this machine
gives only the weaker layers (not root: no PID namespace, no read-only mounts), the
assertions those layers cannot back are expected failures, reported as such.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from redteam_corpus import ATTACKS, MBPP, NEEDS_ISOLATION, TOLERANCE, Listener, run_attack  # noqa: E402

from ebpo.verifiers.code import CodeVerifier  # noqa: E402

TIMEOUT, GRACE = 1.0, 3.0
ROOT = os.geteuid() == 0
CONFIGS = {"default": {}, "os layers only": {"audit_hook": False}}


@pytest.fixture(scope="module", params=[name for name in CONFIGS if ROOT or name == "default"])
def verifier(request) -> CodeVerifier:
    return CodeVerifier(timeout_seconds=TIMEOUT, grace_seconds=GRACE, **CONFIGS[request.param])


@pytest.fixture(scope="module")
def listener():
    listening = Listener()
    yield listening
    listening.close()


def test_corpus_is_large_enough():
    assert len(ATTACKS) >= 40 and len({name for _, name, _ in ATTACKS}) == len(ATTACKS)


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{cls}: {name}" for cls, name, _ in ATTACKS])
def test_attack(verifier, listener, attack):
    cls, name, _ = attack
    layers = verifier.layers
    if name in NEEDS_ISOLATION and not (layers["pid_namespace"] or layers["nobody"]):
        pytest.skip("would signal the test runner itself without a PID namespace or a separate user")
    outcome = run_attack(verifier, attack, listener, hard_limit=TIMEOUT + GRACE + 5)
    assert outcome.error == "", outcome  # the verifier neither raised nor hung
    assert outcome.seconds < TIMEOUT + GRACE + 0.5, outcome  # the hard limit, plus killing and reaping the judge
    assert outcome.reward == 0.0, outcome
    assert outcome.network == [], outcome
    if not (layers["pid_namespace"] and layers["readonly_mounts"]) and (outcome.processes_left or outcome.touched):
        pytest.xfail(f"this machine gives only {layers}: leftovers {outcome}")
    assert outcome.processes_left == 0, outcome
    assert outcome.touched == [], outcome


def test_canonical_solutions_still_pass(verifier):
    assert verifier("def add(a, b):\n    return a + b", MBPP).reward == 1.0
    assert verifier("def truncate(x):\n    return x % 1.0", TOLERANCE).reward == 1.0
    assert verifier("def truncate(x):\n    return x % 1.0 + 1e-3", TOLERANCE).reward == 0.0  # outside the tolerance


def test_the_tests_never_reach_the_child(verifier):
    # Every integer constant in every code object on the child's stack, and every string the
    # child can find in its files: the expected value (918273645) is in none of them.
    secret = json.dumps({"tests": ["assert leak() == 918273645"]})
    probe = """
import sys
seen = set()
def walk(code):
    for c in code.co_consts:
        if type(c) is int:
            seen.add(c)
        elif hasattr(c, 'co_consts'):
            walk(c)
frame = sys._getframe()
while frame:
    walk(frame.f_code)
    frame = frame.f_back
for path in ('/proc/self/cmdline', '/proc/self/environ', 'program.py'):
    try:
        seen.update(int(t) for t in open(path, errors='ignore').read().replace('=', ' ').split() if t.isdigit())
    except OSError:
        pass
def leak():  # any constant that looks like the secret (the probe itself must not contain it)
    return next((c for c in seen if str(c).startswith('9182')), 0)
"""
    assert verifier(probe, secret).reward == 0.0
    assert verifier(probe, json.dumps({"tests": ["assert leak() == 0"]})).reward == 1.0  # the probe runs


def test_plain_data_round_trip(verifier):
    # Everything a test may compare: the judge rebuilds the same types (tuple stays tuple, set stays set).
    value = "[1, -2.5, 'x', None, True, (1, 2), {1, 2}, frozenset({3}), {'a': [1], (1, 2): b'ab'}, 1+2j, float('inf'), 10 ** 30]"
    reference = json.dumps(
        {"tests": [f"assert make() == {value}", "assert type(make()[5]) is tuple and type(make()[6]) is set"]}
    )
    assert verifier(f"def make():\n    return {value}", reference).reward == 1.0
    assert (
        verifier("def make():\n    return [1, -2.5, 'x', None, True, [1, 2]]", reference).reward == 0.0
    )  # list is not tuple


def test_candidate_exceptions_reach_the_tests(verifier):
    reference = json.dumps(
        {
            "tests": [
                "try:\n    f(-1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass",
                "assert f(2) == 4",
            ]
        }
    )
    assert verifier("def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return x * x", reference).reward == 1.0
    assert verifier("def f(x):\n    return x * x", reference).reward == 0.0


def test_unsupported_tests_score_zero_and_are_counted(verifier):
    reference = json.dumps({"tests": ["assert apply(lambda x: x + 1, 1) == 2"]})  # a function cannot cross the pipe
    assert verifier("def apply(f, x):\n    return f(x)", reference).info == {"unsupported_test": 1.0}


def test_run_time_scales_with_calls_not_startup(verifier):
    reference = json.dumps({"tests": [f"assert add({i}, 1) == {i + 1}" for i in range(200)]})
    start = time.monotonic()
    assert verifier("def add(a, b):\n    return a + b", reference).reward == 1.0
    assert time.monotonic() - start < TIMEOUT + GRACE


def test_modules_the_tests_use_without_importing_them(verifier):
    # MBPP tests such as `assert math.isclose(area(2), 12.56, rel_tol=0.001)` rely on the
    # candidate's `import math`; the judge imports such modules itself (they are not the candidate's).
    reference = json.dumps({"tests": ["assert math.isclose(area(3), 28.274, rel_tol=0.001)"]})
    assert verifier("import math\ndef area(r):\n    return math.pi * r * r", reference).reward == 1.0
    assert verifier("import math\ndef area(r):\n    return 2 * math.pi * r", reference).reward == 0.0


def test_stop_iteration_cannot_end_a_test_loop_early(verifier):
    # `all(map(...))` stops at a StopIteration from the function it maps: a candidate that
    # raises it would otherwise pass every test written that way without answering any.
    reference = json.dumps({"tests": ["assert all(map(lambda x: add(x, 1) == x + 1, [1, 2, 3]))"]})
    assert verifier("def add(a, b):\n    raise StopIteration", reference).reward == 0.0
    assert verifier("def add(a, b):\n    return a + b", reference).reward == 1.0
