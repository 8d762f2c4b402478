"""The Transformer: logical axis names only; meshes live in `spmd`."""

from tppjax.models.config import PRESETS, ConfigError, ModelConfig, build_config
from tppjax.models.transformer import Transformer, cross_entropy, scan_blocks

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "Transformer", "build_config", "cross_entropy",
           "scan_blocks"]
