"""The Transformer: logical axis names only; meshes live in `spmd`."""

from models.config import PRESETS, ConfigError, ModelConfig
from models.transformer import Transformer, cross_entropy, scan_blocks

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "Transformer", "cross_entropy", "scan_blocks"]
