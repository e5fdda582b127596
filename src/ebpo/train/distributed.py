"""Data parallelism and mixed precision through ``accelerate``.

One process per device, started by ``accelerate launch`` (or ``torchrun``)::

    accelerate launch --cpu --num_processes 2 -m ebpo train --device cpu ...      # 2 CPU processes, gloo
    accelerate launch --multi_gpu --num_processes 8 -m ebpo train ...             # 8 GPUs, NCCL, DDP
    accelerate launch --config_file fsdp.yaml -m ebpo train --model Qwen/...      # FSDP (docs/trainer.md)

:func:`setup` builds the run's :class:`accelerate.Accelerator`: it joins the
process group (NCCL on GPU, gloo on CPU), pins each process to its local
device (``cuda:LOCAL_RANK``) and owns mixed precision (``--dtype`` is the
compute precision: parameters stay fp32 and forwards run under autocast).
:class:`Dist` wraps the few collectives the trainer needs; with one process
every one of them is the identity.

Invariants the trainer relies on:

* the estimator sees the *gathered* global batch of rewards and group ids,
  so its state is bit-identical on every rank;
* each rank's loss is normalised by the *global* token (or sequence) count,
  so the sum of the ranks' gradients is the full-batch gradient (DDP
  averages instead of summing: the trainer scales by the world size);
* ranks may hold different numbers of responses (dynamic sampling, skipped
  rewards): every rank runs the same number of backward passes per
  optimiser step (:meth:`Dist.max` of the micro-batch counts, padded with
  zero-weight passes), all but the last under ``no_sync``.

Collectives run on the process's device (NCCL accepts only CUDA tensors);
results come back on the caller's device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dist", "setup", "mixed_precision_for"]


@dataclass(frozen=True)
class Dist:
    """This process's rank and the world size, and the accelerator (None: one process, no mixed precision)."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    # ---------------------------------------------------------------- collectives
    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (first dims may differ)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import gather, pad_across_processes

        local = tensor.to(self.device)
        sizes = gather(torch.tensor([local.shape[0]], dtype=torch.int64, device=self.device)).tolist()  # (world,)
        padded = pad_across_processes(local, dim=0)  # (max size, ...) on every rank
        gathered = gather(padded).reshape(self.world, -1, *local.shape[1:])  # (world, max size, ...)
        return torch.cat([gathered[r, : sizes[r]] for r in range(self.world)]).to(tensor.device)

    def local_offset(self, local_count: int, device: torch.device | None = None) -> int:
        """Index of this rank's first row in :meth:`all_gather_cat`'s output."""
        if self.world == 1:
            return 0
        counts = self.all_gather_cat(torch.tensor([local_count], dtype=torch.int64))
        return int(counts[: self.rank].sum())

    def sum(self, value: float, device: torch.device | None = None) -> float:
        if self.world == 1:
            return float(value)
        return float(self.all_gather_cat(torch.tensor([float(value)], dtype=torch.float64)).sum())

    def max(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        return float(self.all_gather_cat(torch.tensor([float(value)], dtype=torch.float64)).max())

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum dicts over ranks by key; ranks may hold different keys (e.g. verifier diagnostics)."""
        if self.world == 1:
            return dict(values)
        from accelerate.utils import gather_object

        total: dict[str, float] = {}
        for part in gather_object([dict(values)]):  # one dict per rank
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + float(value)
        return dict(sorted(total.items()))

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers (LoRA adapters included) to every rank."""
        if self.world == 1:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.copy_(broadcast(tensor.detach().to(self.device).clone(), from_process=0).to(tensor.device))

    # ---------------------------------------------------------------- training
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The model wrapped for gradient sync (DDP/FSDP/DeepSpeed, as launched) and its optimiser."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def autocast(self) -> Any:
        """Context of the forward passes: autocast to the compute dtype under mixed precision."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def no_sync(self, model: Any) -> Any:
        """Accumulate gradients locally (no all-reduce) inside this context."""
        return self.accelerator.no_sync(model) if self.accelerator is not None else contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # scales the loss under fp16

    def clip_grad_norm_(self, parameters: list[torch.nn.Parameter], max_norm: float, model: Any = None) -> float:
        """Global gradient norm before clipping (unscaled under fp16; FSDP-aware).

        Under FSDP the norm is the sharded wrapper's own (``model``, the prepared policy): accelerate hands
        the clipping to it only when given *all* of its parameters, and otherwise clips each rank's shard by
        that shard's norm. With LoRA ``parameters`` is only the adapters, so a rank would clip by a norm
        that is neither the global one nor its neighbour's. The frozen parameters have no gradients and add
        nothing to the wrapper's norm.
        """
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        if self.shards_parameters and model is not None:
            parameters = list(model.parameters())
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else float("nan")

    @property
    def shards_parameters(self) -> bool:
        """Whether the policy is sharded over ranks (FSDP): its parameters exist whole only inside its wrapper's forward."""
        if self.accelerator is None:
            return False
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def sync_calls(self) -> Any:
        """For :func:`ebpo.sampling.generate`'s ``sync``: under FSDP every model call is a collective, so all
        processes make the maximum number of calls; ``None`` otherwise (each process samples on its own)."""
        return (lambda calls: int(self.max(calls))) if self.shards_parameters else None

    # ---------------------------------------------------------------- checkpoint state
    def _state_dict_options(self, **extra: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload only from a GPU: offloading CPU tensors to the CPU crashes FSDP's gather (torch 2.13).
        return StateDictOptions(full_state_dict=True, cpu_offload=self.device.type == "cuda", **extra)

    def full_state_dict(self, model: Any) -> dict[str, Tensor] | None:
        """The whole policy's state dict, gathered from the shards under FSDP (every rank must call this: a
        collective); ``None`` when the plain module's own ``state_dict`` is already whole (no sharding)."""
        if not self.shards_parameters:
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._state_dict_options())

    def optimizer_state_dict(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """The optimiser's whole state keyed by parameter name (gathered under FSDP; every rank calls this).

        Keyed by name rather than by position, the layout of ``torch.distributed.checkpoint``, which reads
        the same under DDP, FSDP and one process.
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=self._state_dict_options())

    def load_optimizer_state_dict(self, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
        """Load :meth:`optimizer_state_dict`'s output (each rank takes its shard under FSDP); a state keyed by
        position (``optimizer.state_dict()``, checkpoints of earlier ebpo versions) is loaded as it is."""
        if all(isinstance(key, int) for key in state.get("state", {})) and not any(
            isinstance(p, str) for group in state.get("param_groups", []) for p in group.get("params", [])
        ):
            if self.shards_parameters:
                raise ValueError(
                    "this checkpoint's optimiser state is keyed by position (written by an earlier ebpo version), "
                    "which FSDP cannot shard: resume it without FSDP, or start a new run from its model/ (--model)"
                )
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, _torch_optimizer(optimizer), state, options=self._state_dict_options())

    @contextlib.contextmanager
    def full_parameters(self, model: Any) -> Iterator[None]:
        """Generation outside the training wrapper: FSDP gathers the root's sharded parameters, others need nothing."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield
        else:
            yield


def _torch_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim`` optimiser under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def mixed_precision_for(dtype: str, device_type: str) -> str:
    """accelerate's ``mixed_precision`` for ``--dtype``: auto is bf16 on CUDA, no (fp32) elsewhere."""
    table = {
        "auto": "bf16" if device_type == "cuda" else "no",
        "float32": "no",
        "fp32": "no",
        "bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "fp16",
        "fp16": "fp16",
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(set(table) - {'auto'})}")
    return table[dtype]


def setup(device: str = "auto", dtype: str = "float32") -> Dist:
    """The run's accelerator for ``--device`` and ``--dtype`` (joins the process group when launched)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        # accelerate's state is a process-wide singleton that refuses a second mixed-precision setting;
        # one process may build several trainers (tests, notebooks), each with its own --dtype.
        AcceleratorState._reset_state(reset_partial_state=True)
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))  # accelerate places a single process on the current device
    elif device.startswith("cuda:"):
        raise ValueError(
            f"--device {device} names one GPU but {os.environ['WORLD_SIZE']} processes were launched; use --device cuda or auto"
        )
    cpu = device == "cpu"
    if device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "auto"
    else:
        try:
            device_type = torch.device(device).type
        except RuntimeError as exc:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available; use --device cpu or auto")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision_for(dtype, device_type))
    if device not in ("auto", "cpu") and accelerator.device.type != torch.device(device).type:
        raise ValueError(
            f"--device {device} is not available here (accelerate chose {accelerator.device}); use --device auto"
        )
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "ebpo train does not support DeepSpeed yet (its engine steps the optimiser inside backward, which this "
            "loop's gradient accumulation does not drive); launch with --multi_gpu (DDP) or an FSDP config (docs/trainer.md)"
        )
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator)
