"""The parallel plan: logical axis names → mesh axes. Changing a layout means changing this table.

Beside each row, the collective it implies (Megatron-LM, Shoeybi et al. 2019; sequence
parallelism, Korthikanti et al. 2022). X = b_mb·s·h activation elements.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tppjax.errors import ConfigError
from tppjax.models.config import ModelConfig

Rule = tuple[str, str | tuple[str, ...] | None]

# The mesh axes that split the batch (data parallelism, and ZeRO-3's `fsdp`, which also splits
# the weights). Everything that places, splits or counts batch rows reads them here: the
# shardings, the pipeline's manual axes, the checks, the census.
BATCH_AXES = ("data", "fsdp")


def batch_shards(mesh_shape) -> int:
    """Into how many parts the batch is split: the product of the `BATCH_AXES` sizes."""
    return int(np.prod([mesh_shape[axis] for axis in BATCH_AXES]))

# The mesh axis that splits the sequence (context parallelism): ring attention's sends, and a
# gradient all-reduce like data parallelism's, since every context shard holds all the weights.
CONTEXT_AXIS = "context"

# The mesh axis that splits the weights (ZeRO-3): the census and closed forms read it here.
WEIGHT_AXIS = "fsdp"

PARAM_RULES: tuple[Rule, ...] = (
    ("vocab", "tensor"),  # vocab-parallel embedding (fwd all-reduce of X) and head (none)
    ("embed", WEIGHT_AXIS),  # ZeRO-3: all-gather a weight before use, reduce-scatter its gradient
    ("heads", "tensor"),  # column-parallel q (none); row-parallel out-proj (all-reduce of X)
    ("kv_heads", "tensor"),  # column-parallel k, v (none)
    ("mlp", "tensor"),  # column-parallel up/gate (none); row-parallel down (all-reduce of X)
    # Layer l lives on stage l // (L/p): the [L, ...] stack is split contiguously over
    # `stage`, so the pipeline's reshape to [p, L/p, ...] moves no data (sends: see pipeline/).
    # Uneven stages pad the stack to equal slots per stage first (pipeline/layout.py).
    ("layers", "stage"),
)


def activation_rules(sequence_parallel: bool) -> tuple[Rule, ...]:
    return (
        ("batch", BATCH_AXES),  # data parallelism: gradient all-reduce once per step
        # Sequence parallelism splits T between blocks: each all-reduce of X becomes a
        # reduce-scatter (after row-parallel) + all-gather (before column-parallel), same bytes.
        # Context parallelism splits T everywhere (`tokens`, inside a block): attention is the
        # only op that mixes positions, and its ring passes K, V around (`spmd.context`).
        ("seq", (CONTEXT_AXIS, "tensor") if sequence_parallel else CONTEXT_AXIS),
        ("tokens", CONTEXT_AXIS),
        ("embed", None),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),  # logits stay vocab-sharded; the loss reduces (B, T) statistics
    )


@dataclasses.dataclass(frozen=True)
class Rules:
    sequence_parallel: bool = False

    @property
    def activations(self) -> tuple[Rule, ...]:
        return activation_rules(self.sequence_parallel)

    def param_spec(self, logical: tuple[str | None, ...]) -> PartitionSpec:
        table = dict(PARAM_RULES)
        return PartitionSpec(*(table[name] if name else None for name in logical))


def param_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules,
                    unsplit: tuple[str, ...] = ()):
    """NamedShardings for a parameter state, read from each Param's logical `out_sharding`;
    the logical names in `unsplit` are left whole."""

    def one(var):
        logical = var.get_metadata().get("out_sharding") or (None,) * var.ndim
        logical = [None if name in unsplit else name for name in logical]
        return var.replace(NamedSharding(mesh, rules.param_spec(tuple(logical))))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_layout(
    cfg: ModelConfig, mesh_shape: dict[str, int], batch: int, seq_len: int, rules: Rules
) -> None:
    """Every divisibility the plan needs, checked before anything compiles, one line each."""
    cfg.validate()
    t, dp = mesh_shape["tensor"], batch_shards(mesh_shape)
    need = [
        (cfg.n_heads, t, "n_heads", "tensor", "heads"),
        (cfg.n_kv_heads, t, "n_kv_heads", "tensor", "kv-heads"),
        (cfg.d_ff, t, "d_ff (mlp width)", "tensor", "d-ff"),
        (cfg.padded_vocab, t, "padded vocabulary", "tensor", "vocab-multiple"),
        (cfg.d_model, mesh_shape[WEIGHT_AXIS], "d_model", WEIGHT_AXIS, "d-model"),
        (batch, dp, "batch size", " x ".join(BATCH_AXES), "batch-size"),
    ]
    cp = mesh_shape[CONTEXT_AXIS]
    if cp > 1:  # zigzag: 2·cp equal chunks (`spmd.context`)
        need.append((seq_len, 2 * cp, "sequence length", f"2 x {CONTEXT_AXIS}", "seq-len"))
    if rules.sequence_parallel:
        need.append((seq_len, cp * t, "sequence length (sequence parallelism)",
                     f"{CONTEXT_AXIS} x tensor" if cp > 1 else "tensor", "seq-len"))
    for value, size, what, axis, flag in need:
        if value % size:
            raise ConfigError(
                f"{what} ({value}) is not divisible by the {axis} axis ({size}); "
                f"change --{flag} or the --mesh"
            )
    if seq_len > cfg.max_seq_len:
        raise ConfigError(
            f"sequence length ({seq_len}) exceeds max_seq_len ({cfg.max_seq_len}); "
            "lower --seq-len or raise --max-seq-len"
        )
