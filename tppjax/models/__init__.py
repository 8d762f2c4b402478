"""The Transformer: logical axis names only; meshes live in `spmd`."""

from tppjax.models.config import PRESETS, ModelConfig, build_config
from tppjax.models.transformer import Transformer, cross_entropy, project

__all__ = ["PRESETS", "ModelConfig", "Transformer", "build_config", "cross_entropy", "project"]
