"""``stepwise``: a built-in reasoning task whose solutions are short worked derivations.

The built-in ``arithmetic`` task asks for a bare answer (about 4 tokens):
there is nothing to reason through, so RL moves its accuracy by a point or
two and methods cannot be told apart. ``stepwise`` asks for the same kind of
sums, but as chains of 3-5 terms evaluated left to right, with every
intermediate result written out before a final ``#`` marker::

    prompt  "3+5+8-2+7="
    target  "3+5=8;8+8=16;16-2=14;14+7=21;#21"

Only the final answer after the last ``#`` is scored (verifier
``stepwise``, below); the steps are free, as in RL with outcome rewards.
Completions are 15-35 tokens (23 on average), errors compound over the steps, and the topics
run from trivial to out of reach of a warm-started tiny model, so at the
start of RL many groups are all-fail at small G while sampling 16 times often
finds a right answer: the sparse-reward regime of the papers (docs/testbed.md).

The training targets are a sloppy solver's: a step that carries, borrows or
multiplies slips by one with probability ``slip_rate`` (0.6), any other step
with ``plain_slip_rate`` (0.1), and the chain carries on from the slip. The
warm-started model then knows each step but samples slips, so RL has a skill
to sharpen from outcome rewards (``Problem.answer`` is always right, and the
held-out targets are clean).

Topics (``Problem.topic``), in order of difficulty:

* ``add1``: three 1-digit terms added (``3+5+8=``).
* ``chain4``: four 1-digit terms, ``+`` or ``-`` (``9-4+7+2=``).
* ``mul1``: a product of two digits, then two 1-digit terms (``7*8+5-3=``).
* ``chain5``: five 1-digit terms, ``+`` or ``-``.
* ``add2``: three 2-digit terms, ``+`` or ``-`` (``34+57-12=``).

Subtractions never go below zero (the subtrahend is drawn at most the
running value), so every number is written without a sign. Operators are
evaluated left to right, and ``*`` only appears first, so left-to-right and
the usual precedence agree. ``Problem.difficulty`` in [0, 1] is the topic's
rank plus the share of digit columns that carry or borrow.

The held-out set is drawn from its own seed and its prompts are removed from
training (as in ``arithmetic``, including ``exclude_eval_seeds``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ebpo.tasks.base import TASKS, GeneratedSplits, Problem
from ebpo.verifiers.base import VERIFIERS, VerifierResult

__all__ = [
    "StepwiseTask",
    "StepwiseVerifier",
    "TOPICS",
    "RECOMMENDED",
    "DEFAULT_SLIP_RATE",
    "DEFAULT_PLAIN_SLIP_RATE",
    "make_problem",
    "derivation",
    "MARKER",
]

MARKER = "#"
"""Marks the final answer; the verifier reads what follows the last one."""

STEP_SEPARATOR = ";"

DEFAULT_SLIP_RATE = 0.6
"""Probability that a carrying step of a training demonstration is off by one (:class:`StepwiseTask`)."""
DEFAULT_PLAIN_SLIP_RATE = 0.1
"""Probability that any other step of a training demonstration is off by one."""


@dataclass(frozen=True)
class _Shape:
    terms: int  # numbers in the chain
    digits: int  # digits of each added/subtracted number
    ops: str  # operators drawn for the additive steps
    product_first: bool = False  # the first step multiplies two digits


TOPICS: dict[str, _Shape] = {
    "add1": _Shape(terms=3, digits=1, ops="+"),
    "chain4": _Shape(terms=4, digits=1, ops="+-"),
    "mul1": _Shape(terms=4, digits=1, ops="+-", product_first=True),
    "chain5": _Shape(terms=5, digits=1, ops="+-"),
    "add2": _Shape(terms=3, digits=2, ops="+-"),
}
"""Topic name -> shape, easiest first (the order gives ``difficulty``)."""


def _carries(a: int, b: int, op: str) -> tuple[int, int]:
    """(columns that carry or borrow, columns) of the written sum or difference ``a op b``."""
    columns = max(len(str(a)), len(str(b)))
    carry, count = 0, 0
    for i in range(columns):  # column arithmetic is sequential in the carry
        x, y = (a // 10**i) % 10, (b // 10**i) % 10
        if op == "+":
            carry = int(x + y + carry >= 10)
        else:
            carry = int(x - y - carry < 0)
        count += carry
    return count, columns


def derivation(numbers: list[int], ops: list[str], slips: list[int] | None = None) -> tuple[str, int]:
    """The worked derivation ``"a+b=c;c-d=e;#e"`` of a left-to-right chain, and its final value.

    ``slips[i]`` is added to the result of step ``i`` (a demonstrator's slip, :class:`StepwiseTask`'s
    ``slip_rate``); later steps carry on from the slipped value, so the final value is then wrong.
    """
    value, steps = numbers[0], []
    for i, (op, number) in enumerate(zip(ops, numbers[1:])):
        result = value + number if op == "+" else value - number if op == "-" else value * number
        result += slips[i] if slips else 0
        steps.append(f"{value}{op}{number}={result}")
        value = result
    return STEP_SEPARATOR.join(steps) + f"{STEP_SEPARATOR}{MARKER}{value}", value


def _draw_slips(
    rng: random.Random, numbers: list[int], ops: list[str], slip_rate: float, plain_slip_rate: float
) -> list[int]:
    """Per-step slips of +-1, with probability ``slip_rate`` on a step that carries or borrows (as written,
    from the previous written result) or multiplies, ``plain_slip_rate`` on the others; a -1 that would
    take a later value below 0 becomes +1.

    Slips add up along the chain (``*`` only comes first), so the written value after step ``i`` is
    the true one plus the slips so far; the true values are never negative, and a slip of +1 cannot
    make them so.
    """
    true_values = [numbers[0]]
    for op, number in zip(ops, numbers[1:]):
        value = true_values[-1]
        true_values.append(value * number if op == "*" else value + number if op == "+" else value - number)
    slips, offset = [], 0
    for i, (op, number) in enumerate(zip(ops, numbers[1:])):
        hard = op == "*" or _carries(true_values[i] + offset, number, op)[0] > 0
        slip = rng.choice((-1, 1)) if rng.random() < (slip_rate if hard else plain_slip_rate) else 0
        if slip < 0 and min(true_values[i + 1 :]) + offset - 1 < 0:
            slip = 1
        slips.append(slip)
        offset += slip
    return slips


def make_problem(
    rng: random.Random, topic: str, *, index: int, split: str, slip_rate: float = 0.0, plain_slip_rate: float = 0.0
) -> Problem:
    """One random problem of ``topic`` (a key of :data:`TOPICS`).

    ``Problem.target`` is the worked derivation, in which the result of each step that carries or
    borrows (and of the product) is off by one, up or down, with probability ``slip_rate``, and of
    every other step with probability ``plain_slip_rate``: the demonstration the warm start imitates,
    not the answer (``Problem.answer`` is always the true value).
    """
    shape = TOPICS[topic]
    low, high = (1, 9) if shape.digits == 1 else (10 ** (shape.digits - 1), 10**shape.digits - 1)
    if shape.product_first:
        numbers, ops = [rng.randint(2, 9), rng.randint(2, 9)], ["*"]
    else:
        numbers, ops = [rng.randint(low, high)], []
    value = numbers[0] * numbers[1] if shape.product_first else numbers[0]
    carried, columns = 0, 0
    while len(numbers) < shape.terms:  # each step depends on the running value
        op = rng.choice(shape.ops)
        if op == "-" and value < low:
            op = "+"
        number = rng.randint(low, min(high, value)) if op == "-" else rng.randint(low, high)
        c, n = _carries(value, number, op)
        carried, columns = carried + c, columns + n
        value = value + number if op == "+" else value - number
        numbers.append(number)
        ops.append(op)
    _, answer = derivation(numbers, ops)
    target, _ = derivation(
        numbers,
        ops,
        _draw_slips(rng, numbers, ops, slip_rate, plain_slip_rate) if slip_rate or plain_slip_rate else None,
    )
    rank = list(TOPICS).index(topic)
    difficulty = (rank + carried / max(columns, 1)) / len(TOPICS)
    prompt = "".join(f"{n}{op}" for n, op in zip(numbers, ops)) + f"{numbers[-1]}="
    return Problem(
        id=f"stepwise-{split}-{index}",
        prompt=prompt,
        answer=str(answer),
        topic=topic,
        difficulty=difficulty,
        target=target,
    )


RECOMMENDED: dict[str, Any] = {
    "max_new_tokens": 44,
    "warmstart_steps": 1000,
    "warmstart_batch_size": 32,
    "warmstart_lr": 3e-3,
    "prompts_per_step": 128,
    "lr": 3e-4,
    "steps": 60,
}
"""Settings of ``ebpo train`` for this task (docs/testbed.md): the longest target is 34 tokens plus EOS;
1000 warm-start steps of 32 on the slipped demonstrations leave the tiny model a sloppy solver
(held-out avg@4 ~0.34, pass@16 ~0.85). RL: large batches (the outcome-reward gradient of 24-token
completions is noisy; 32 prompts per step drift down even at lr 3e-4), 60 steps, inside 5 minutes on
2 cores with the warm start."""


@TASKS.register("stepwise")
@dataclass
class StepwiseTask(GeneratedSplits):
    """Left-to-right chains of sums, differences and a product, solved step by step.

    Args:
        num_train: training problems (the training stream cycles through them).
        num_eval: held-out problems.
        topics: topic names (keys of :data:`TOPICS`) to draw from; None = all.
        topic_weights: relative frequency of each topic in ``topics`` (None = uniform).
        seed: seed of the training problems.
        eval_seed: seed of the held-out problems (separate from ``seed``).
        exclude_eval_seeds: held-out sets (drawn with these seeds and ``num_eval``) kept out of both
            splits, as in ``arithmetic`` (``ebpo meta`` validates on its own split this way).
    """

    num_train: int = 20000
    num_eval: int = 256
    topics: tuple[str, ...] | None = None
    topic_weights: tuple[float, ...] | None = None
    seed: int = 0
    eval_seed: int = 1_000_003
    exclude_eval_seeds: tuple[int, ...] = ()
    slip_rate: float = DEFAULT_SLIP_RATE
    plain_slip_rate: float = DEFAULT_PLAIN_SLIP_RATE
    name: str = field(default="stepwise", init=False)
    verifier: str = field(default="stepwise", init=False)

    recommended: dict[str, Any] = field(default_factory=lambda: dict(RECOMMENDED), init=False)
    """``ebpo train`` settings this task is measured with (:data:`RECOMMENDED`), applied by ``ebpo train`` under
    the preset, YAML and flags (:class:`~ebpo.tasks.base.Task`)."""

    def __post_init__(self) -> None:
        self.topics = tuple(self.topics or TOPICS)
        unknown = [t for t in self.topics if t not in TOPICS]
        if unknown or not self.topics:
            raise ValueError(f"stepwise topics must be a non-empty list of {list(TOPICS)}, got {list(self.topics)}")
        self.topic_weights = tuple(self.topic_weights or (1.0,) * len(self.topics))
        if (
            len(self.topic_weights) != len(self.topics)
            or any(w < 0 for w in self.topic_weights)
            or sum(self.topic_weights) <= 0
        ):
            raise ValueError(
                f"stepwise topic_weights needs {len(self.topics)} non-negative weights with a positive sum, got {self.topic_weights}"
            )
        for name in (
            "slip_rate",
            "plain_slip_rate",
        ):  # each wrong value gets rate / 2: the true one stays the likeliest
            if not 0.0 <= getattr(self, name) < 2 / 3:
                raise ValueError(
                    f"stepwise {name} must be in [0, 2/3) (the right result must stay the likeliest), got {getattr(self, name)}"
                )
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError(f"stepwise needs num_train >= 1 and num_eval >= 1, got {self.num_train}, {self.num_eval}")
        self._build_splits()

    def _make(self, rng: random.Random, index: int, split: str) -> Problem:
        topic = rng.choices(self.topics, weights=self.topic_weights)[0]  # type: ignore[arg-type]
        train = split == "train"  # held-out targets stay clean (they are never taught)
        return make_problem(
            rng,
            topic,
            index=index,
            split=split,
            slip_rate=self.slip_rate if train else 0.0,
            plain_slip_rate=self.plain_slip_rate if train else 0.0,
        )


_FINAL = re.compile(r"\d+")


@VERIFIERS.register("stepwise")
class StepwiseVerifier:
    """Reward 1.0 when the integer after the completion's last ``#`` equals the reference, else 0.0.

    Only the final answer counts: the steps before it are not checked. The
    answer is the digits right after the last marker, up to the end of that
    line; anything else on that line (``#57x``), no marker, or no digits
    after it scores 0 (no marker or no digits is also ``info["parse_error"]``).

    >>> StepwiseVerifier()("2+3=5;5*3=15;#15", "15").reward
    1.0
    >>> StepwiseVerifier()("2+3=5;5*3=15;15", "15").info
    {'parse_error': 1.0}
    """

    def __call__(self, completion: str, reference: str) -> VerifierResult:
        if not _FINAL.fullmatch(reference.strip()):
            raise ValueError(f"stepwise reference must be a non-negative integer, got {reference!r}")
        position = completion.rfind(MARKER)
        if position < 0:
            return VerifierResult(0.0, {"parse_error": 1.0})
        lines = completion[position + 1 :].splitlines()
        answer = lines[0].strip() if lines else ""
        if not answer:
            return VerifierResult(0.0, {"parse_error": 1.0})
        return VerifierResult(1.0 if _FINAL.fullmatch(answer) and int(answer) == int(reference) else 0.0)
