"""The other answers to the zero-signal problem: JSPO, SPO and KRPO, in the one estimator registry.

Three baselines from the literature, each an :class:`~ebpo.estimators.Estimator`
built by ``build_estimator(name, **options)`` and called like every other
(docs/methods.md#other-baselines)::

    jspo   James-Stein shrinkage of the leave-one-out prompt baseline toward the
           mean of the other prompts (arXiv 2511.03710; guanning03/JSPO-Official,
           code/verl/trainer/ppo/core_algos.py, compute_jspo_outcome_advantage). Stateless.
    spo    a per-prompt Beta success tracker that persists across steps
           (Single-stream Policy Optimization, arXiv 2509.13232, in the form the EBPO
           authors' verl fork registers as ``spo``: Tonyzhou98/verl, core_algos.py,
           SPOTracker / compute_spo_outcome_advantage). Needs ``prompt_ids``.
    krpo   a 1D Kalman filter over each group's rewards (arXiv 2505.07527;
           billhhh/KRPO_LLMs_RL, train.py, KalmanFilter / group_advantages).
           Stateless as released; ``carry=True`` (ours) keeps each prompt's filter.

How each departs from its paper or released code is said where it happens and
collected in docs/methods.md#other-baselines. Everything is vectorised over
responses and groups; the Kalman filter is sequential by definition and loops
over the positions within a group (at most max G iterations of (M,) operations).

Per-prompt state (SPO's tracker, KRPO's carried filters) is a :class:`PromptTable`:
sorted int64 prompt keys and a float64 row per key, updated with sorted-key
merges, so its content is a function of the sequence of batches alone. Callers
in data-parallel training pass the batch gathered from every rank (the trainer,
the TRL adapter), so every rank holds bit-identical state, as with EBPO's prior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebpo.estimators import EPS, ESTIMATORS, PromptedBatch
from ebpo.stats import find_sorted

__all__ = ["JSPO", "SPO", "KRPO", "PromptTable"]


def _require_prompts(batch: PromptedBatch, who: str) -> Tensor:
    """The batch's per-group prompt keys (M,), or a ValueError saying how to pass them."""
    if batch.group_prompts is None:
        raise ValueError(
            f"{who} keeps state per prompt across steps and needs prompt_ids= (N,), the same id for a prompt at "
            "every step (e.g. ebpo.estimators.stable_prompt_ids of the problem ids); group ids only name a group "
            "within one batch"
        )
    return batch.group_prompts


def _standardise(advantages: Tensor, *, center: bool, std_normalize: bool, eps: float) -> float:
    """Batch-level centring and std division (N-1, + eps), in place, as EBPO's; returns the raw mean."""
    raw_mean = float(advantages.mean())
    if center:
        advantages.sub_(raw_mean)
    if std_normalize:
        advantages.div_(advantages.std(unbiased=True) + eps)
    return raw_mean


# ---------------------------------------------------------------- JSPO


@ESTIMATORS.register("jspo")
class JSPO:
    """James-Stein shrinkage baseline (Zeng et al., arXiv 2511.03710), docs/methods.md#jspo.

    For response i of prompt q, with M prompts in the batch, group means mu_k
    and v_k = s_k^2 / G_k (s_k^2 the unbiased within-group variance)::

        loo_{q,i} = (sum_{j != i} r_{q,j}) / (G_q - 1)                  leave-one-out prompt mean
        mu_{-q}   = mean_{k != q} mu_k                                  mean of the other prompts
        v_{-q}    = mean_{k != q} v_k                                   noise of a prompt mean
        s_{-q}    = mean_{k != q} (mu_k - mu_{-q})^2                    spread of the prompt means
        lambda_q  = v_{-q} / (v_{-q} + s_{-q} + eps)                    [* (M-1)/M with paper_factor]
        A_{q,i}   = r_{q,i} - ((1 - lambda_q) loo_{q,i} + lambda_q mu_{-q})

    Every statistic leaves out the response's own prompt (and the
    leave-one-out mean its own reward), so the baseline is independent of
    r_{q,i} and the gradient stays unbiased. No std division, as the code.

    Args:
        paper_factor: multiply lambda by (M-1)/M, the paper's optimal
            coefficient; the released code (default) omits the factor.
        eps: added to the denominator of lambda (1e-6, the code's epsilon).

    Departures: groups of unequal size use each group's own G_k in v_k and
    average the other prompts' *means* (the code assumes equal G, where the
    mean of the other prompts' samples is the same number); with one prompt
    in the batch there are no other prompts and lambda = 0 (plain RLOO; the
    code divides by zero there, and the paper's (M-1)/M factor is 0).
    """

    min_group_size = 2  # the leave-one-out mean needs another response of the prompt

    def __init__(self, paper_factor: bool = False, eps: float = EPS) -> None:
        if not eps > 0:
            raise ValueError(f"jspo eps must be > 0, got {eps}")
        self.paper_factor, self.eps = bool(paper_factor), float(eps)

    def compute(self, batch: PromptedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        sizes, means, m = batch.group_sizes, batch.group_means, batch.num_groups  # (M,), (M,), M
        noise = batch.group_var(unbiased=True) / sizes  # (M,) v_k, the variance of mu_k as an estimate
        if m == 1:  # no other prompt to shrink toward: RLOO
            lam = torch.zeros_like(means)
            other_mean, other_noise, spread = means.clone(), torch.zeros_like(means), torch.zeros_like(means)
        else:
            # Leave-one-prompt-out statistics from the batch totals, O(M): sum minus own term, and the sum of
            # squared deviations with one point removed, Q - M/(M-1) (mu_q - mean)^2 (Welford's removal step).
            other_noise = ((noise.sum() - noise) / (m - 1)).clamp_min(0.0)  # (M,) v_{-q}
            other_mean = (means.sum() - means) / (m - 1)  # (M,) mu_{-q}
            deviation = means - means.mean()  # (M,)
            squares = deviation * deviation
            spread = ((squares.sum() - squares * (m / (m - 1))) / (m - 1)).clamp_min(0.0)  # (M,) s_{-q}
            lam = other_noise / (other_noise + spread + self.eps)  # (M,)
            if self.paper_factor:
                lam = lam * ((m - 1) / m)
        # A = r - (1-lam) loo - lam mu_{-q} = (1-lam) G/(G-1) (r - mu_q) + lam (r - mu_{-q}); the first term
        # from the centred rewards, exactly 0 in an all-equal group (as RLOO's).
        loo_weight = (1.0 - lam) * sizes / (sizes - 1.0)  # (M,)
        advantages = batch.grouping.map(torch.mul, batch.centred, loo_weight)  # (N,)
        advantages += batch.grouping.map(lambda r, w, mu: w * (r - mu), batch.rewards, lam, other_mean)
        metrics = {
            "jspo/lambda": float(lam.mean()),
            "jspo/v2": float(other_noise.mean()),
            "jspo/s2": float(spread.mean()),
        }
        return advantages, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"jspo is stateless but got state keys {sorted(state)}")


# ---------------------------------------------------------------- per-prompt state


@dataclass(frozen=True)
class PromptTable:
    """One float64 row of ``width`` values per prompt key, held as tensors and updated by sorted merges.

    ``keys`` (K,) int64 sorted and unique; ``values`` (K, width) float64.

    >>> table = PromptTable.empty(2).put(torch.tensor([9, 4]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> table.keys.tolist(), table.values.tolist()
    ([4, 9], [[3.0, 4.0], [1.0, 2.0]])
    >>> rows, found = table.get(torch.tensor([4, 5]), torch.tensor([0.0, 0.0]))
    >>> rows.tolist(), found.tolist()
    ([[3.0, 4.0], [0.0, 0.0]], [True, False])
    """

    keys: Tensor
    values: Tensor

    @classmethod
    def empty(cls, width: int) -> PromptTable:
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, width, dtype=torch.float64))

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    def get(self, keys: Tensor, default: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (U, width) of ``keys`` (U,), ``default`` (width,) for keys not held, and which were held (U,)."""
        held = self.keys.to(keys.device)
        slot, found = find_sorted(held, keys)  # (U,) each
        rows = default.to(device=keys.device, dtype=torch.float64).expand(keys.numel(), self.width)
        if held.numel():
            rows = torch.where(found.unsqueeze(1), self.values.to(keys.device)[slot], rows)
        return rows.clone(), found

    def put(self, keys: Tensor, rows: Tensor) -> PromptTable:
        """A new table with ``rows`` (U, width) under ``keys`` (U,) unique, replacing rows already held."""
        device = keys.device
        held = self.keys.to(device)
        union = torch.unique(torch.cat([held, keys]), sorted=True)  # (K',)
        values = torch.zeros(union.numel(), self.width, dtype=torch.float64, device=device)
        values.index_copy_(0, torch.searchsorted(union, held), self.values.to(device))
        values.index_copy_(0, torch.searchsorted(union, keys), rows.to(torch.float64))
        return PromptTable(union, values)

    def state_dict(self) -> dict[str, Tensor]:
        return {"keys": self.keys.detach().cpu().clone(), "values": self.values.detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], width: int, who: str) -> PromptTable:
        missing = {"keys", "values"} - set(state)
        if missing:
            raise ValueError(f"{who} state is missing {sorted(missing)}")
        keys, values = torch.as_tensor(state["keys"]), torch.as_tensor(state["values"])
        if keys.dim() != 1 or keys.is_floating_point() or keys.dtype == torch.bool:
            raise ValueError(
                f"{who} state: prompt keys must be a 1-D integer tensor, got {tuple(keys.shape)} {keys.dtype}"
            )
        if values.shape != (keys.numel(), width):
            raise ValueError(f"{who} state: values must have shape {(keys.numel(), width)}, got {tuple(values.shape)}")
        keys, values = keys.to(torch.long), values.to(torch.float64)
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError(f"{who} state: prompt keys must be sorted and unique")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{who} state holds non-finite values")
        return cls(keys, values)


# ---------------------------------------------------------------- SPO


@ESTIMATORS.register("spo")
class SPO:
    """Per-prompt Beta success tracker (SPO, arXiv 2509.13232; the EBPO authors' fork), docs/methods.md#spo.

    Each prompt q keeps (alpha_q, beta_q), a Beta posterior over its success
    probability, from every earlier step at which it was drawn. A prompt
    never seen starts from (n0 * v0, n0 * (1 - v0)). Per step::

        V_q    = alpha_q / (alpha_q + beta_q)             (before this step's update)
        A_raw  = r - V_q
        A      = (A_raw - mean(A_raw)) / (std(A_raw, N-1) + eps)      (batch-level, as EBPO's)
        alpha_q <- rho * alpha_q + y_q,   beta_q <- rho * beta_q + (1 - y_q)

    where y_q is the group's mean *correctness* (the verifier's outcome in
    [0, 1], before reward shaping). All groups of one prompt in a batch see
    the same V_q and their observations are added under one discount.

    Args:
        rho: the forgetting factor per visit, in (0, 1] (the fork's 0.9).
        prior_count: n0, the prior's weight in pseudo-observations (8 =
            1/(1 - 0.875), the fork's and the paper's N_0 = 1/(1 - rho_min)).
        prior_mean: v0, the prior success probability of an unseen prompt (0.5, the fork's).
        per_response: count each response as one observation (y_q summed
            over the group, 1 - y summed likewise) instead of the group mean
            as one (the fork). With one response per prompt, the paper's
            single-stream setting, the two are the same.
        std_normalize, center, eps: the batch-level standardisation (on by default, as the fork).

    Departures from the paper: its forgetting factor adapts to the policy's
    KL divergence since the prompt was last seen (rho = 2^(-D/D_half)); an
    estimator sees rewards only, so rho is fixed here (as in the fork). The
    paper initialises each prompt from n0 samples of the initial policy; the
    fork and this start from v0. Its prioritised prompt sampling is a
    rollout allocation, not an estimator. From the fork: the tracker is keyed
    by ``prompt_ids`` (the fork keys verl's uid, which upstream verl draws
    afresh for every prompt at every step, so there each prompt would stay
    at the prior 0.5); it learns from correctness, and refuses values
    outside [0, 1] where the fork clamps the (possibly shaped) reward.
    """

    min_group_size = 1  # single-stream: a prompt's baseline comes from its history, not its group

    def __init__(
        self,
        rho: float = 0.9,
        prior_count: float = 8.0,
        prior_mean: float = 0.5,
        per_response: bool = False,
        std_normalize: bool = True,
        center: bool = True,
        eps: float = EPS,
    ) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"spo rho must be in (0, 1], got {rho}")
        if not (math.isfinite(prior_count) and prior_count > 0):
            raise ValueError(f"spo prior_count must be a finite number > 0, got {prior_count}")
        if not 0.0 <= prior_mean <= 1.0:
            raise ValueError(f"spo prior_mean must be in [0, 1], got {prior_mean}")
        if not eps > 0:
            raise ValueError(f"spo eps must be > 0, got {eps}")
        self.rho, self.prior_count, self.prior_mean = float(rho), float(prior_count), float(prior_mean)
        self.per_response, self.std_normalize, self.center, self.eps = bool(per_response), std_normalize, center, eps
        self.table = PromptTable.empty(2)  # (alpha, beta) per prompt

    def _config(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "prior_count": self.prior_count,
            "prior_mean": self.prior_mean,
            "per_response": self.per_response,
        }

    def compute(self, batch: PromptedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        prompts = _require_prompts(batch, "spo")  # (M,)
        if self.std_normalize and batch.num_responses < 2:
            raise ValueError("spo batch-level standardisation needs at least 2 responses in the batch")
        low, high = batch.correctness.aminmax()
        if not (0.0 <= float(low) and float(high) <= 1.0):
            raise ValueError(
                f"spo tracks each prompt's success probability (a Beta posterior) and needs correctness in [0, 1], "
                f"got values in [{float(low):.6g}, {float(high):.6g}]; pass correctness= (the verifier's outcome "
                "before shaping) or rewards in [0, 1]"
            )
        keys, prompt_of_group = torch.unique(prompts, sorted=True, return_inverse=True)  # (U,), (M,)
        prior = torch.tensor(
            [self.prior_count * self.prior_mean, self.prior_count * (1.0 - self.prior_mean)], dtype=torch.float64
        )
        counts, seen = self.table.get(keys, prior)  # (U, 2) alpha, beta before this step; (U,)
        value = counts[:, 0] / (counts[:, 0] + counts[:, 1])  # (U,) V_q
        baseline = value.index_select(0, prompt_of_group)  # (M,)
        advantages = batch.grouping.map(torch.sub, batch.rewards, baseline)  # (N,) A_raw, fresh
        raw_mean = _standardise(advantages, center=self.center, std_normalize=self.std_normalize, eps=self.eps)
        if self.per_response:
            successes = batch.grouping.sum(batch.correctness)  # (M,)
            failures = batch.group_sizes - successes
        else:
            successes = batch.group_correctness  # (M,) y_q
            failures = 1.0 - successes
        observed = torch.zeros_like(counts).index_add_(0, prompt_of_group, torch.stack([successes, failures], dim=1))
        metrics = {
            "spo/baseline_mean": float(baseline.mean()),
            "spo/new_prompt_frac": float((~seen).index_select(0, prompt_of_group).double().mean()),
            "spo/raw_adv_mean": raw_mean,
        }
        table = self.table.put(keys, self.rho * counts + observed)
        metrics["spo/tracked_prompts"] = float(table.keys.numel())
        if training:  # evaluation never moves the tracker
            self.table = table
        return advantages, metrics

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), **self.table.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = {key: state.get(key) for key in self._config()}
        if saved != self._config():
            raise ValueError(f"spo state was saved with {saved} but this estimator has {self._config()}")
        self.table = PromptTable.from_state_dict(state, 2, "spo")


# ---------------------------------------------------------------- KRPO


@ESTIMATORS.register("krpo")
class KRPO:
    """Kalman-filtered baseline (KRPO, arXiv 2505.07527; billhhh/KRPO_LLMs_RL), docs/methods.md#krpo.

    A 1D Kalman filter with a random-walk state reads a group's rewards one
    at a time, in batch order, from (x_0, P_0); response i's advantage uses
    the estimate *after* its own reward::

        P-   = P + Q,   K = P- / (P- + R)
        x   <- x + K (r_i - x),   P <- (1 - K) P-
        A_i  = (r_i - x) / (sqrt(P) + eps)

    Args:
        process_var: Q (1e-5, the code's).
        meas_var: R (1e-2, the code's).
        init_mean, init_var: x_0 and P_0 of a fresh filter (0 and 1, the code's).
        eps: added to sqrt(P) (1e-8, the code's).
        carry: False (the released code): a fresh filter for every group.
            True (ours): one filter per prompt that carries (x, P) from step
            to step (needs ``prompt_ids``); the responses of all groups of
            a prompt in one batch form one sequence.

    No batch standardisation (the code has none): the scale is 1/sqrt(P),
    which grows as the filter settles. A group whose rewards are all 0 gets
    exactly 0 with the code's x_0 = 0; a group of all 1s gets positive
    advantages, the filter's lag behind its prior.
    """

    min_group_size = 1

    def __init__(
        self,
        process_var: float = 1e-5,
        meas_var: float = 1e-2,
        init_mean: float = 0.0,
        init_var: float = 1.0,
        eps: float = 1e-8,
        carry: bool = False,
    ) -> None:
        for name, value in (("process_var", process_var), ("init_var", init_var)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"krpo {name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(meas_var) and meas_var > 0):
            raise ValueError(f"krpo meas_var must be a finite number > 0, got {meas_var}")
        if not math.isfinite(init_mean):
            raise ValueError(f"krpo init_mean must be finite, got {init_mean}")
        if not eps > 0:
            raise ValueError(f"krpo eps must be > 0, got {eps}")
        self.process_var, self.meas_var = float(process_var), float(meas_var)
        self.init_mean, self.init_var, self.eps, self.carry = float(init_mean), float(init_var), float(eps), carry
        self.table = PromptTable.empty(2)  # carry: (x, P) per prompt after its last observation

    def _config(self) -> dict[str, Any]:
        return {
            "process_var": self.process_var,
            "meas_var": self.meas_var,
            "init_mean": self.init_mean,
            "init_var": self.init_var,
        }

    def compute(self, batch: PromptedBatch, *, training: bool) -> tuple[Tensor, dict[str, float]]:
        rewards = batch.rewards  # (N,)
        if self.carry:  # one sequence per prompt, starting where the prompt's filter stopped
            keys, prompt_of_group = torch.unique(_require_prompts(batch, "krpo carry=True"), return_inverse=True)
            fresh = torch.tensor([self.init_mean, self.init_var], dtype=torch.float64)
            start, seen = self.table.get(keys, fresh)  # (U, 2) x and P where each prompt's filter stopped
            sequence = prompt_of_group.index_select(0, batch.grouping.index)  # (N,) each response's prompt
        else:  # one fresh filter per group (the released code)
            sequence = batch.grouping.index  # (N,)
            start = torch.tensor([[self.init_mean, self.init_var]], dtype=torch.float64, device=rewards.device)
            start = start.expand(batch.num_groups, 2)  # (M, 2)
        num, n = start.shape[0], rewards.numel()
        # Each response's position in its sequence, in batch order: a stable sort by sequence, then the
        # rank after the sequence's first slot.
        order = torch.argsort(sequence, stable=True)  # (N,)
        lengths = torch.bincount(sequence, minlength=num)  # (S,)
        first = torch.cumsum(lengths, 0) - lengths  # (S,)
        position = torch.empty_like(order)
        position[order] = torch.arange(n, device=order.device) - first.index_select(0, sequence.index_select(0, order))
        width = int(lengths.max())
        observed = torch.zeros(num, width, dtype=torch.float64, device=rewards.device)  # (S, L) padded rewards
        observed[sequence, position] = rewards
        active = torch.arange(width, device=rewards.device) < lengths.unsqueeze(1)  # (S, L)
        mean, var = start[:, 0].clone(), start[:, 1].clone()  # (S,) x and P
        means, variances = torch.empty_like(observed), torch.empty_like(observed)  # (S, L) after each reward
        for step in range(width):  # the filter is sequential: positions in turn, every sequence at once
            predicted = var + self.process_var
            gain = predicted / (predicted + self.meas_var)
            live = active[:, step]
            mean = torch.where(live, mean + gain * (observed[:, step] - mean), mean)
            var = torch.where(live, (1.0 - gain) * predicted, var)
            means[:, step], variances[:, step] = mean, var
        baseline = means[sequence, position]  # (N,) x after the response's own reward
        scale = variances[sequence, position].sqrt()  # (N,)
        advantages = (rewards - baseline) / (scale + self.eps)
        metrics = {"krpo/baseline_mean": float(baseline.mean()), "krpo/posterior_std_mean": float(scale.mean())}
        if self.carry:
            table = self.table.put(keys, torch.stack([mean, var], dim=1))
            metrics["krpo/new_prompt_frac"] = float((~seen).index_select(0, prompt_of_group).double().mean())
            metrics["krpo/tracked_prompts"] = float(table.keys.numel())
            if training:  # evaluation never moves the filters
                self.table = table
        return advantages, metrics

    def state_dict(self) -> dict[str, Any]:
        if not self.carry:
            return {}
        return {**self._config(), **self.table.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.carry:
            if state:
                raise ValueError(
                    f"krpo with carry=False is stateless but got state keys {sorted(state)} "
                    "(a state saved with carry=True?)"
                )
            return
        if not state:
            raise ValueError("krpo with carry=True got an empty state (saved with carry=False?)")
        saved = {key: state.get(key) for key in self._config()}
        if saved != self._config():
            raise ValueError(f"krpo state was saved with {saved} but this estimator has {self._config()}")
        self.table = PromptTable.from_state_dict(state, 2, "krpo")
