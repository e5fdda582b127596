"""``ebpo train``: the RLVR trainer (config, presets, rollout, loop, checkpoints)."""

from ebpo.train.config import TrainConfig, field_docs, validate
from ebpo.train.presets import PRESETS, list_methods

__all__ = ["TrainConfig", "field_docs", "validate", "PRESETS", "list_methods"]
