"""The built-in task: procedurally generated arithmetic with a spread of difficulty.

Each problem is a sum or a product of 1-3 integers of 1-3 digits, written
``"12+7+305="``; the reference answer is the decimal result (``"324"``) and
the ``exact`` verifier scores it. Every problem draws its shape (number of
terms, digits per term, operator), so the stream runs from copying a single
digit (trivial) to multiplying three 3-digit numbers (out of reach of a tiny
model); shapes are uniform by default (``term_weights``/``digit_weights``
reweight them); ``Problem.difficulty`` in [0, 1] grows with terms, digits and
the product operator, and ``Problem.topic`` names the shape (``"add-2x2"``:
two 2-digit terms), so the ``topic`` and ``difficulty`` curricula work on it.

The held-out set is drawn from a separate seed, and its prompts are removed
from the training set so evaluation never scores a prompt seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ebpo.tasks.base import TASKS, GeneratedSplits, Problem

__all__ = ["ArithmeticTask", "make_problem"]

_OPS = {"+": "add", "*": "mul"}


def make_problem(
    rng: random.Random,
    *,
    max_terms: int,
    max_digits: int,
    ops: str,
    index: int,
    split: str,
    term_weights: tuple[float, ...] | None = None,
    digit_weights: tuple[float, ...] | None = None,
) -> Problem:
    """One random problem; terms and digits drawn with the given weights (uniform when None), the operator uniformly."""
    terms = rng.choices(range(1, max_terms + 1), weights=term_weights)[0]
    digits = rng.choices(range(1, max_digits + 1), weights=digit_weights)[0]
    op = rng.choice(ops)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    numbers = [rng.randint(low, 10**digits - 1) for _ in range(terms)]
    result = numbers[0]
    for number in numbers[1:]:
        result = result + number if op == "+" else result * number
    # Difficulty in [0, 1]: one unit per extra term, per extra digit, and for a product (a single term has no operator).
    is_product = terms > 1 and op == "*"
    difficulty = ((terms - 1) + (digits - 1) + int(is_product)) / ((max_terms - 1) + (max_digits - 1) + 1)
    topic = f"{_OPS[op] if terms > 1 else 'copy'}-{terms}x{digits}"
    return Problem(
        id=f"arith-{split}-{index}",
        prompt=op.join(str(n) for n in numbers) + "=",
        answer=str(result),
        topic=topic,
        difficulty=difficulty,
    )


@TASKS.register("arithmetic")
@dataclass
class ArithmeticTask(GeneratedSplits):
    """Sums and products of 1..``max_terms`` integers of 1..``max_digits`` digits.

    Args:
        num_train: training problems (the training stream cycles through them).
        num_eval: held-out problems.
        max_terms: most terms in one problem.
        max_digits: most digits per term.
        ops: operators to draw from (``"+*"``, or ``"+"`` for sums only).
        term_weights: relative frequency of 1, 2, ... terms (None = uniform).
        digit_weights: relative frequency of 1, 2, ... digits per term (None = uniform).
        seed: seed of the training problems.
        eval_seed: seed of the held-out problems (separate from ``seed``).
        exclude_eval_seeds: held-out sets (drawn with these seeds and ``num_eval``) kept out of
            both splits (the evaluation split loses its overlap with them, so it may hold fewer than
            ``num_eval`` problems); ``ebpo meta`` validates on its own split this way, never on the final
            held-out set, and final runs pass ``exclude_eval_seeds: [424242]`` to train on the same problems.
    """

    num_train: int = 20000
    num_eval: int = 256
    max_terms: int = 3
    max_digits: int = 3
    ops: str = "+*"
    term_weights: tuple[float, ...] | None = None
    digit_weights: tuple[float, ...] | None = None
    seed: int = 0
    eval_seed: int = 1_000_003
    exclude_eval_seeds: tuple[int, ...] = ()
    name: str = field(default="arithmetic", init=False)
    verifier: str = field(default="exact", init=False)

    def __post_init__(self) -> None:
        if self.max_terms < 1 or self.max_digits < 1:
            raise ValueError(
                f"arithmetic needs max_terms >= 1 and max_digits >= 1, got {self.max_terms}, {self.max_digits}"
            )
        if not self.ops or set(self.ops) - set(_OPS):
            raise ValueError(f"arithmetic ops must be a non-empty string of '+' and '*', got {self.ops!r}")
        self.term_weights = tuple(self.term_weights or (1.0,) * self.max_terms)
        self.digit_weights = tuple(self.digit_weights or (1.0,) * self.max_digits)
        for name, weights, size in (
            ("term_weights", self.term_weights, self.max_terms),
            ("digit_weights", self.digit_weights, self.max_digits),
        ):
            if len(weights) != size or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"arithmetic {name} needs {size} non-negative weights with a positive sum, got {weights}"
                )
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError(
                f"arithmetic needs num_train >= 1 and num_eval >= 1, got {self.num_train}, {self.num_eval}"
            )
        self._build_splits()

    def _make(self, rng: random.Random, index: int, split: str) -> Problem:
        return make_problem(
            rng,
            max_terms=self.max_terms,
            max_digits=self.max_digits,
            ops=self.ops,
            index=index,
            split=split,
            term_weights=self.term_weights,
            digit_weights=self.digit_weights,
        )
