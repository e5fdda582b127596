"""Hostile completions against the math and gsm8k verifiers, and the registry's error guard.

The verifier classes are called directly (not through the registry's guard), so a
raise here is the verifier's own bug: each must return a reward, never raise, and
return quickly whatever the input.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time

import pytest

from ebpo.verifiers import VERIFIERS, VerifierResult, build_verifier
from ebpo.verifiers.answers import extract_answer, normalize_digits
from ebpo.verifiers.base import BadReference, GuardedVerifier
from ebpo.verifiers.gsm8k import GSM8KVerifier

requires_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="math-verify not installed"
)

sys.path.insert(0, os.path.dirname(__file__))
from redteam_corpus import ARABIC_INDIC, FULLWIDTH, MATH_BOLD, NEWLINES  # noqa: E402
from redteam_corpus import TEXT_ATTACKS as HOSTILE  # noqa: E402


@pytest.mark.parametrize("completion", HOSTILE, ids=range(len(HOSTILE)))
def test_gsm8k_never_raises_and_is_fast(completion):
    start = time.monotonic()
    result = GSM8KVerifier()(completion, "42")
    assert time.monotonic() - start < 1.0
    assert result.reward in (0.0, 1.0)


@requires_math_verify
def test_math_never_raises_and_returns_within_its_limit():
    from ebpo.verifiers.math_verifier import MathVerifier

    verifier = MathVerifier(timeout_seconds=1, isolation="process")  # one worker for all inputs
    try:
        for completion in HOSTILE:
            start = time.monotonic()
            result = verifier(completion, "42")
            assert time.monotonic() - start < 3 * 1 + 2 + 1.5, completion[:50]  # the worker's hard limit
            assert result.reward in (0.0, 1.0), completion[:50]
    finally:
        verifier.close()


@pytest.mark.parametrize("completion", [FULLWIDTH, ARABIC_INDIC, MATH_BOLD])
def test_unicode_digits_are_read_as_digits(completion):
    assert GSM8KVerifier()(f"The answer is {completion}", "42").reward == 1.0
    assert normalize_digits(completion) == "42"


@requires_math_verify
@pytest.mark.parametrize(
    "completion", [f"\\boxed{{{FULLWIDTH}}}", f"\\boxed{{{ARABIC_INDIC}}}", f"\\boxed{{{MATH_BOLD}}}"]
)
def test_math_reads_unicode_digits(completion):
    from ebpo.verifiers.math_verifier import MathVerifier

    assert MathVerifier(isolation="signal")(completion, "42").reward == 1.0


def test_extraction_is_linear():
    start = time.monotonic()
    assert extract_answer(NEWLINES) == "42" or extract_answer(NEWLINES) is None
    assert extract_answer("answer is" + "\n" * 40000 + " 42") == "42"  # the answer may follow on a later line
    assert time.monotonic() - start < 0.5


def test_size_guard_comes_before_extraction():
    huge = "The answer is 42. " + "x" * 200_000
    assert GSM8KVerifier()(huge, "42").info == {"oversize": 1.0}
    assert GSM8KVerifier(max_completion_chars=300_000)(huge, "42").reward == 1.0


# --- the registry's guard: any verifier, a user's too -----------------------------------


def _flaky(completion: str, reference: str) -> VerifierResult:
    if reference == "bad":
        raise BadReference("the reference is broken")
    if "boom" in completion:
        raise RuntimeError("a bug this completion triggers")
    return VerifierResult(1.0 if completion == reference else 0.0)


def make_flaky():  # a user's verifier factory, named by import path
    return _flaky


def test_guard_turns_completion_errors_into_counted_zero_rewards(caplog):
    verifier = VERIFIERS.build(f"{__name__}:make_flaky")  # a user's verifier by import path gets the guard too
    assert isinstance(verifier, GuardedVerifier)
    with caplog.at_level(logging.WARNING, logger="ebpo.verifiers.base"):
        assert verifier("boom", "x") == VerifierResult(0.0, {"error": 1.0})
    assert "RuntimeError" in caplog.text and "boom" in caplog.text  # a sampled log line
    assert verifier("x", "x").reward == 1.0
    with pytest.raises(BadReference):  # the dataset's fault: loud
        verifier("x", "bad")


def test_guard_warns_when_the_verifier_errors_on_most_completions(caplog):
    verifier = GuardedVerifier(_flaky, "flaky", window=10)
    with caplog.at_level(logging.WARNING, logger="ebpo.verifiers.base"):
        for _ in range(10):
            verifier("boom", "x")
    assert "100% of the last 10 completions" in caplog.text
    caplog.clear()
    quiet = GuardedVerifier(_flaky, "flaky", window=10)
    with caplog.at_level(logging.WARNING, logger="ebpo.verifiers.base"):
        for i in range(10):
            quiet("boom" if i < 3 else "x", "x")
    assert "of the last" not in caplog.text


def test_training_score_counts_verifier_errors():
    from types import SimpleNamespace

    from ebpo.train.rollout import score

    rollout = SimpleNamespace(texts=["boom", "x"], problems=[SimpleNamespace(answer="x")] * 2)
    rewards, keep, info = score(rollout, build_verifier(f"{__name__}:make_flaky"))
    assert rewards.tolist() == [0.0, 1.0] and keep.tolist() == [True, True] and info == {"verifier/error": 1.0}
