"""``math``: final-answer extraction plus symbolic equivalence through math-verify.

The completion's answer is extracted (last ``\\boxed{}``, "answer is", last
number; :mod:`ebpo.verifiers.answers`) and compared with the reference by
`math-verify <https://pypi.org/project/math-verify/>`_ (sympy-based: ``1/2``
equals ``0.5`` and ``\\frac{2}{4}``, ``x^2+1`` equals ``1+x^2``).

Symbolic comparison can hang (``9^{9^{9^9}}``), so two guards apply:

* an input-size guard: an extracted answer longer than ``max_answer_chars``
  (default 500) is not parsed (reward 0, ``info["oversize"]``);
* a per-call time limit (``timeout_seconds``, default 5) enforced by
  math-verify's own SIGALRM timer, which only works in the main thread of
  the main interpreter. Called from another thread the verifier raises
  instead of running without a limit (the trainer scores in the main thread).

Parse failures and time-outs are expected: they give reward 0 and are
counted in ``info``; any other error raises.
"""

from __future__ import annotations

import threading

from ebpo.verifiers.answers import extract_answer
from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = ["MathVerifier"]


@VERIFIERS.register("math")
class MathVerifier:
    def __init__(self, timeout_seconds: int = 5, max_answer_chars: int = 500) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:  # an optional dependency: say how to get it
            raise ValueError("the math verifier needs math-verify: pip install 'ebpo[math]'") from exc
        if timeout_seconds < 1:
            raise ValueError(f"timeout_seconds must be >= 1 (SIGALRM has one-second resolution), got {timeout_seconds}")
        self.timeout_seconds, self.max_answer_chars = timeout_seconds, max_answer_chars

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the math verifier enforces its time limit with SIGALRM and must run in the main thread")
        answer = extract_answer(completion)
        if answer is None:
            return VerifierResult(0.0, {"parse_error": 1.0})
        if len(answer) > self.max_answer_chars:
            return VerifierResult(0.0, {"oversize": 1.0})
        try:
            gold = parse(_as_latex(reference), parsing_timeout=self.timeout_seconds, raise_on_error=True)
            pred = parse(_as_latex(answer), parsing_timeout=self.timeout_seconds, raise_on_error=True)
            if not pred:
                return VerifierResult(0.0, {"parse_error": 1.0})
            if not gold:
                raise ValueError(f"math reference could not be parsed: {reference!r}")
            correct = verify(gold, pred, timeout_seconds=self.timeout_seconds, raise_on_error=True)
        except TimeoutException:
            return VerifierResult(0.0, {"timeout": 1.0})
        return VerifierResult(1.0 if correct else 0.0)


def _as_latex(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify's LaTeX extractor sees it whole."""
    text = text.strip()
    if "\\boxed" in text or text.startswith("$"):
        return text
    return f"${text}$"
