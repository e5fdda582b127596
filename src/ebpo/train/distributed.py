"""Data parallelism with plain ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``accelerate launch -m ebpo train ...`` (or ``torchrun``) starts one process
per device and sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; :func:`setup`
joins the process group from those variables. A single process needs none of
it: :class:`Dist` then makes every collective the identity.

Why no DDP wrapper: each rank computes its loss normalised by the *global*
token (or sequence) count, so the sum of the ranks' gradients is exactly the
full-batch gradient; :meth:`Dist.sum_gradients` all-reduces them once per
optimiser step. Ranks may then hold different numbers of responses (dynamic
sampling, skipped rewards) without any collective going out of step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

__all__ = ["Dist", "setup"]


@dataclass(frozen=True)
class Dist:
    """This process's rank and the world size; collectives are no-ops when world == 1."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (first dims may differ)."""
        if self.world == 1:
            return tensor
        local_size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        sizes = [torch.zeros_like(local_size) for _ in range(self.world)]
        torch_dist.all_gather(sizes, local_size)
        max_size = int(max(int(s) for s in sizes))
        padded = torch.zeros((max_size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.zeros_like(padded) for _ in range(self.world)]
        torch_dist.all_gather(gathered, padded)
        return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])

    def local_offset(self, local_count: int, device: torch.device | None = None) -> int:
        """Index of this rank's first row in :meth:`all_gather_cat`'s output."""
        if self.world == 1:
            return 0
        counts = self.all_gather_cat(torch.tensor([local_count], dtype=torch.int64, device=device))
        return int(counts[: self.rank].sum())

    def sum(self, value: float, device: torch.device | None = None) -> float:
        if self.world == 1:
            return float(value)
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch_dist.all_reduce(tensor)
        return float(tensor)

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum dicts over ranks by key; ranks may hold different keys (e.g. verifier diagnostics)."""
        if self.world == 1:
            return dict(values)
        gathered: list[dict[str, float]] = [{} for _ in range(self.world)]
        torch_dist.all_gather_object(gathered, dict(values))
        total: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + float(value)
        return dict(sorted(total.items()))

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of ``parameters`` in one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(parameters, grads):
            count = grad.numel()
            param.grad = flat[offset : offset + count].view_as(param).clone()
            offset += count

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def setup(device: torch.device) -> Dist:
    """Join the process group named by the environment (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=torch_dist.get_rank(), world=torch_dist.get_world_size())
