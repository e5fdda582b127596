"""FSDP on CPU for tests: the trainer under a real ``FullyShardedDataParallel`` wrapper, 2 processes over gloo.

accelerate builds FSDP only on GPUs (``--cpu`` means DDP over gloo), but torch's FSDP (version 1) runs on
CPU. :func:`enable` makes ``ebpo.train``'s accelerator an FSDP one after it has joined the gloo process
group, with the settings docs/trainer.md's ``fsdp.yaml`` gives (full sharding, the decoder layers wrapped,
``use_orig_params``), so ``accelerator.prepare`` wraps the policy exactly as on GPUs. What differs from a
GPU run is only the device and the collectives' backend.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu.py train --device cpu ...   # ebpo's CLI
"""

from __future__ import annotations

import sys

import torch


def enable() -> None:
    """Patch the trainer's ``setup`` to return an FSDP accelerator (call before building a ``Trainer``)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    import ebpo.train.trainer as trainer_module

    real_setup = trainer_module.setup

    def fsdp_setup(device: str = "auto", dtype: str = "float32"):
        dist = real_setup(device, dtype)
        assert dist.world > 1, "launch with torch.distributed.run --nproc_per_node 2"
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            reshard_after_forward="FULL_SHARD",
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            use_orig_params=True,
            sync_module_states=False,
            state_dict_type="FULL_STATE_DICT",
        )
        PartialState().distributed_type = DistributedType.FSDP
        PartialState().device = torch.device("cpu")  # FSDP checks device_id against the compute device "cpu"
        AcceleratorState().fsdp_plugin = plugin
        assert dist.shards_parameters
        return dist

    trainer_module.setup = fsdp_setup


if __name__ == "__main__":
    enable()
    from ebpo.cli import main

    sys.exit(main(sys.argv[1:]))
