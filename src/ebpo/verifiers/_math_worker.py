"""math-verify comparison, callable in-process or as a worker process (``python _math_worker.py``).

This file imports nothing from ebpo, so :class:`ebpo.verifiers.math_verifier.MathVerifier`
can start it by path with the current interpreter. As a worker it reads one JSON
request per line on stdin (``{"reference": ..., "answer": ..., "timeout": ...}``)
and writes one JSON reply per line on stdout: ``{"status": "ok", "correct":
bool}``, or status ``parse_error`` / ``timeout`` / ``reference_error`` /
``error`` (with ``"message"``). The worker's own main thread uses math-verify's
SIGALRM limit; the parent adds a hard wall-clock limit and kills the worker
when even that fails (a computation stuck in C never sees the alarm).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

__all__ = ["compare", "as_latex"]


def as_latex(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify's LaTeX extractor sees it whole."""
    text = text.strip()
    if "\\boxed" in text or text.startswith("$"):
        return text
    return f"${text}$"


def compare(reference: str, answer: str, timeout: int | None) -> dict[str, Any]:
    """Parse both with math-verify and compare them; ``timeout=None`` disables its SIGALRM limit."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold = parse(as_latex(reference), parsing_timeout=timeout, raise_on_error=True)
    except TimeoutException:
        return {"status": "reference_error", "message": f"math reference timed out in parsing: {reference[:200]!r}"}
    except Exception as exc:  # noqa: BLE001  (the reference is ours: reported, and raised by the caller)
        return {
            "status": "reference_error",
            "message": f"math reference could not be parsed ({type(exc).__name__}: {exc}): {reference[:200]!r}",
        }
    if not gold:
        return {"status": "reference_error", "message": f"math reference could not be parsed: {reference!r}"}
    try:
        pred = parse(as_latex(answer), parsing_timeout=timeout, raise_on_error=True)
        if not pred:
            return {"status": "parse_error"}
        correct = verify(gold, pred, timeout_seconds=timeout, raise_on_error=True)
    except TimeoutException:
        return {"status": "timeout"}
    except MemoryError:  # a model's expression blew the worker's memory limit: its fault, a timeout-like failure
        return {"status": "timeout"}
    except Exception:  # noqa: BLE001  (sympy raises many types on odd input; the completion's answer is at fault)
        return {"status": "parse_error"}
    return {"status": "ok", "correct": bool(correct)}


def _serve() -> None:
    if len(sys.argv) > 1:  # an address-space limit, so a huge expression cannot exhaust the host's memory
        import resource

        limit = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import math_verify  # noqa: F401  (import before the first request: the parent's clock starts then)

    sys.stdout.write(json.dumps({"status": "ready"}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = compare(request["reference"], request["answer"], request["timeout"])
        except Exception:  # noqa: BLE001  (not swallowed: sent to the parent, which raises it)
            reply = {"status": "error", "message": traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
