"""One frozen config for the Transformer; presets are constants, variants come from `replace`."""

import dataclasses
from typing import Literal

import jax.numpy as jnp

from tppjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Transformer.

    `style="llama"`: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases.
    `style="gpt2"`: LayerNorm, learned positions, GELU MLP, biases.
    """

    vocab_size: int = 256  # byte-level text by default
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 16
    n_kv_heads: int = 8  # grouped-query attention: n_heads // n_kv_heads query heads share one K/V
    d_ff: int = 384
    max_seq_len: int = 256
    style: Literal["llama", "gpt2"] = "llama"
    tie_embeddings: bool = False
    # The vocabulary is padded (and the pad logits masked) to a multiple of this, so that the
    # `tensor` axis can split it. It is mesh-independent, so every mesh sees the same parameters.
    vocab_multiple: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    compute_dtype: str = "float32"  # "bfloat16": bf16 matmuls, float32 master weights and loss

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        k = self.vocab_multiple
        return -(-self.vocab_size // k) * k

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def validate(self) -> None:
        """Mesh-independent checks; mesh divisibility is checked in `spmd.rules`. Messages name
        the flags of the scripts that build a config from flags (train, explain, bench)."""
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads "
                              f"({self.n_heads}); change --d-model or --heads")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                              f"({self.n_kv_heads}); change --heads or --kv-heads")
        if self.style == "llama" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim (d_model / n_heads), got "
                              f"{self.head_dim}; change --d-model or --heads")
        if self.style not in ("llama", "gpt2"):
            raise ConfigError(f"unknown --style {self.style!r}; use llama or gpt2")


def build_config(preset: str, **overrides) -> ModelConfig:
    """A preset with `overrides`; a field the user left unset takes its style's default.

    GPT-2 (Radford et al. 2019) is multi-head (kv heads = heads), has an MLP of 4·d and ties the
    output head to the embedding; Llama's presets keep grouped-query attention, a SwiGLU width
    of 3·d and an untied head.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    if cfg.style == "gpt2":
        gpt2 = {"n_kv_heads": cfg.n_heads, "d_ff": 4 * cfg.d_model, "tie_embeddings": True}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in gpt2.items() if k not in overrides})
    return cfg


PRESETS = {
    # Tests: a few seconds to compile on 2 CPU cores.
    "tiny": ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64),
    # The default training run: the loss visibly falls within two minutes on 2 cores.
    "small": ModelConfig(),
    # Closer to a real model; for accelerators.
    "base": ModelConfig(
        d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=1024
    ),
}
