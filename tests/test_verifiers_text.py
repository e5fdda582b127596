"""math and gsm8k verifiers: tables of equivalent forms, wrong answers and malformed output."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest

from ebpo.verifiers import VerifierResult, build_verifier, list_verifiers
from ebpo.verifiers.math_verifier import _Worker

# The gsm8k tests need nothing optional; the math tests need math-verify.
requires_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="math-verify not installed"
)

GSM8K = [
    # (completion, reference, reward)  -- why
    ("#### 72", "72", 1.0),  # GSM8K's own marker
    (
        "She sold 48 + 24 = 72 clips.\n#### 72",
        "Natalia sold 48/2 = 24 clips...\n#### 72",
        1.0,
    ),  # full reference solution
    ("The answer is 1,234.", "1234", 1.0),  # thousands separator and trailing period
    ("So the total is $1,234.00", "1234", 1.0),  # dollar sign and cents
    ("The answer is 3.50", "3.5", 1.0),  # trailing zero of a decimal
    ("The answer is -7.", "-7", 1.0),  # negative with period
    ("#### -7", "-7", 1.0),  # negative after the marker
    ("It takes 18 dollars", "18", 1.0),  # unit word after the number
    ("Answer: 45%", "45", 1.0),  # percent sign
    ("\\boxed{10}", "10", 1.0),  # a boxed answer also counts
    ("First 3 apples, then 5 more, so 8", "8", 1.0),  # last number fallback
    ("The answer is 0.25", ".25", 1.0),  # leading-dot reference
    ("#### 1,000,000", "1000000", 1.0),  # several separators
    ("The final answer is 12", "#### 12", 1.0),  # 'final answer is'
    ("answer: 007", "7", 1.0),  # leading zeros are the same number
    ("#### 5", "6", 0.0),  # wrong number
    ("The answer is 72.5", "72", 0.0),  # close but wrong
    ("The answer is 1,234", "1243", 0.0),  # digits transposed
    ("I think it is 9, no wait, 8", "9", 0.0),  # the last number is the answer
    ("-72", "72", 0.0),  # sign matters
    ("#### 72\nand then 13 more tokens", "72", 1.0),  # the marker beats trailing numbers
    ("The answer is seventy-two", "72", 0.0),  # words are not parsed: parse error
    ("", "72", 0.0),  # empty completion
    ("I don't know", "72", 0.0),  # no number at all
    ("#### ", "72", 0.0),  # empty marker, no number anywhere
    ("The answer is 3/4", "0.75", 0.0),  # fractions are not decimals for gsm8k (exact numeric match)
    ("\\boxed{}", "3", 0.0),  # empty box
    ("The answer is 1e3", "1000", 1.0),  # scientific notation parses as a decimal
    ("#### 2.0", "2", 1.0),  # 2.0 == 2
    ("Total: 56 cookies.\n#### 56", "56", 1.0),  # marker after prose
    ("It costs 5 dollars.", "5", 1.0),  # unit word and trailing period together
    ("#### -3.50", "-3.5", 1.0),  # negative decimal with a trailing zero
    (
        "The answer is 12 apples and 3 pears",
        "12",
        1.0,
    ),  # answer-is takes the text after 'is'... first number wins there
]


@pytest.mark.parametrize("completion,reference,reward", GSM8K)
def test_gsm8k_table(completion, reference, reward):
    assert build_verifier("gsm8k")(completion, reference).reward == reward


MATH = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # fraction vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # the other way round
    ("\\boxed{\\frac{2}{4}}", "\\frac12", 1.0),  # unreduced fraction, short \frac
    ("The answer is $x^2+1$.", "1+x^2", 1.0),  # commutativity
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),  # radicals
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),  # tuples and spacing
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),  # \dfrac
    ("\\boxed{2\\pi}", "2\\pi", 1.0),  # symbols
    ("\\boxed{\\pi \\cdot 2}", "2\\pi", 1.0),  # product order
    ("so we get \\boxed{\\boxed{7}}", "7", 1.0),  # nested boxes
    ("\\boxed{{7}}", "7", 1.0),  # extra braces
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),  # the last box counts
    ("\\boxed{10\\%}", "10", 1.0),  # percent
    ("\\boxed{x=5}", "5", 1.0),  # an equation's right-hand side
    ("\\boxed{-\\frac{1}{3}}", "-1/3", 1.0),  # negative fraction
    ("The final answer is 17", "17", 1.0),  # 'final answer is'
    ("Therefore 42", "42", 1.0),  # last-number fallback
    ("\\boxed{1.000}", "1", 1.0),  # trailing zeros
    ("\\boxed{\\left(2, 3\\right)}", "(2,3)", 1.0),  # \left \right
    ("\\boxed{2^{10}}", "1024", 1.0),  # evaluates powers
    ("\\boxed{3}", "4", 0.0),  # wrong
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),  # 0.33 is not 1/3
    ("\\boxed{x^2-1}", "x^2+1", 0.0),  # wrong sign
    ("\\boxed{(2,1)}", "(1,2)", 0.0),  # tuple order matters
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),  # wrong radical
    ("no answer here", "5", 0.0),  # nothing to extract: parse error
    ("", "5", 0.0),  # empty completion
    ("\\boxed{3", "3", 1.0),  # unbalanced box: falls back to the last number
    ("\\boxed{}", "3", 0.0),  # empty box
    ("The answer is \\text{blue}", "5", 0.0),  # text answer against a number
    ("\\boxed{5}", "5", 1.0),  # the plain case
    ("\\boxed{-5}", "5", 0.0),  # sign
]


@pytest.fixture(scope="module", params=["signal", "process"])
def math_verifier(request):
    verifier = build_verifier("math", isolation=request.param)
    yield verifier
    verifier.close()


@requires_math_verify
@pytest.mark.parametrize("completion,reference,reward", MATH)
def test_math_table(math_verifier, completion, reference, reward):
    # Both isolation modes (in-process SIGALRM, worker process) must agree with the table.
    assert math_verifier(completion, reference).reward == reward


@requires_math_verify
def test_math_in_a_worker_thread_uses_a_worker_process():
    verifier = build_verifier("math", timeout_seconds=1)  # isolation="auto"
    results: dict[str, tuple[VerifierResult, float]] = {}

    def score() -> None:
        for key, completion, reference in [
            ("right", "\\boxed{\\frac{2}{4}}", "0.5"),
            ("slow", "\\boxed{12345678^{12345678}}", "12345678^{12345678}+0"),
        ]:
            start = time.monotonic()
            results[key] = (verifier(completion, reference), time.monotonic() - start)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    verifier.close()
    assert results["right"][0].reward == 1.0
    assert results["slow"][0] == VerifierResult(0.0, {"timeout": 1.0})  # math-verify's alarm, inside the worker
    assert results["slow"][1] < 3 * 1 + 2 + 1


@requires_math_verify
def test_math_worker_is_killed_at_the_hard_limit_and_restarted():
    # A hard limit below math-verify's own (10 s) stands in for a computation stuck in C.
    worker = _Worker(memory_bytes=4 << 30)
    start = time.monotonic()
    assert worker.request("12345678^{12345678}+0", "12345678^{12345678}", timeout=10, hard_limit=1.0) == {
        "status": "timeout",
        "killed": True,
    }
    assert time.monotonic() - start < 3 and worker.proc is None
    assert worker.request("1/2", "0.5", timeout=5, hard_limit=30) == {"status": "ok", "correct": True}  # a fresh worker
    worker.close()


@requires_math_verify
def test_signal_isolation_refuses_worker_threads():
    verifier = build_verifier("math", isolation="signal")
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, lambda: verifier("\\boxed{1}", "1")))
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def _capture(errors: list[BaseException], call) -> None:
    try:
        call()
    except RuntimeError as exc:
        errors.append(exc)


@requires_math_verify
def test_math_options_and_reference_errors():
    with pytest.raises(ValueError, match="isolation"):
        build_verifier("math", isolation="thread")
    with pytest.raises(ValueError, match="timeout_seconds"):
        build_verifier("math", timeout_seconds=0.5)
    with pytest.raises(ValueError, match="reference could not be parsed"):
        build_verifier("math")("\\boxed{1}", "\\text{}")


@requires_math_verify
def test_math_counts_parse_errors_and_oversize():
    verifier = build_verifier("math", max_answer_chars=50)
    assert verifier("nothing", "5").info == {"parse_error": 1.0}
    assert verifier("\\boxed{" + "1+" * 100 + "1}", "201").info == {"oversize": 1.0}


@requires_math_verify
@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{9^{9^{9^{9^{9}}}}}",  # a tower sympy would try to evaluate
        "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",  # deep nesting
        "x" * 100_000,  # a huge completion
    ],
)
def test_math_pathological_input_returns_within_the_time_limit(completion):
    verifier = build_verifier("math", timeout_seconds=2)
    start = time.monotonic()
    result = verifier(completion, "9^{9^{9^{9^{9}}}}+1")
    assert time.monotonic() - start < 2 * 2 + 1  # parse + verify each have the limit
    assert result.reward == 0.0


def test_registry_lists_verifiers():
    assert {"code", "exact", "gsm8k", "math"} <= set(list_verifiers())


def test_unreadable_gsm8k_reference_raises():
    with pytest.raises(ValueError, match="not a number"):
        build_verifier("gsm8k")("#### 3", "three")


@pytest.mark.parametrize(
    "module",
    [
        "ebpo.verifiers.base",
        "ebpo.verifiers.answers",
        "ebpo.verifiers.gsm8k",
        "ebpo.verifiers.code",
        "ebpo.verifiers.reasoning_gym",
        "ebpo.verifiers.math_verifier",
    ],
)
def test_verifier_docstring_examples(module):
    if module.endswith("math_verifier") and importlib.util.find_spec("math_verify") is None:
        pytest.skip("math-verify not installed")
    import doctest

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
