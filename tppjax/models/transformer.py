"""Decoder-only Transformer in Flax NNX. It knows logical axis names only, never a mesh.

Dimension alphabet, used in shapes, einsum strings and logical names alike:
  B batch, T sequence, D model width (`embed`), N query heads (`heads`), K key/value heads
  (`kv_heads`), H head width, F MLP width (`mlp`), V padded vocabulary (`vocab`), L layers.

Every parameter is declared once with its logical axes (`_param`). Activations are pinned with
`constrain` where tensor parallelism acts; `spmd.rules` decides what each name means on a mesh.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

from tppjax.models.config import ModelConfig


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names, if a rules context is active.

    Outside `flax.core.spmd.logical_axis_rules(...)` (the single-device model) this is a no-op.
    Mesh axes that the caller has made manual (inside a `shard_map`) are already split by hand,
    so they are left out of the constraint.
    """
    rules = dict(flax_spmd.get_logical_axis_rules())
    if not rules:
        return x
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)

    def auto(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a not in manual)
        return kept[0] if len(kept) == 1 else (kept or None)

    spec = PartitionSpec(*(auto(rules[n]) if n else None for n in names))
    return jax.lax.with_sharding_constraint(x, spec)


def project(spec: str, x: jax.Array, weight: nnx.Variable) -> jax.Array:
    """`x` times a weight, by an einsum `spec`, in x's dtype. Every weight product of a block goes
    through here. A weight whose metadata holds a `product` runs through it instead: the door by
    which a zero-bubble pipeline keeps each product's input and output gradient for a later
    weight-gradient step (`tppjax.pipeline.actions`)."""
    product = weight.get_metadata().get("product")
    if product is not None:
        return product(spec, x, weight[...])
    return jnp.einsum(spec, x, weight[...].astype(x.dtype))


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    """A weight (a projection or an embedding table): normal init, `role="weight"`."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, role="weight")


def _const(role: str, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    """A norm `"gain"` (init 1) or a `"bias"` (init 0). The role is declared here, where the
    parameter is, because its shape cannot tell: blocks are stacked, so a gain is (L, D)."""
    value = {"gain": 1.0, "bias": 0.0}[role]
    return nnx.Param(jnp.full(shape, value, jnp.float32), out_sharding=axes, role=role)


class Norm(nnx.Module):
    """RMSNorm (llama) or LayerNorm with bias (gpt2), computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.eps, self.rms = cfg.norm_eps, cfg.style == "llama"
        self.scale = _const("gain", (cfg.d_model,), ("embed",))
        self.bias = None if self.rms else _const("bias", (cfg.d_model,), ("embed",))

    def __call__(self, x):  # (B, T, D)
        x32 = x.astype(jnp.float32)
        if not self.rms:
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """(B, T, N, H) queries against (B, T, K, H) keys and values; the query in slot i sees the
    keys at text positions up to its own, `positions[i]`."""
    seen = positions[None, :] <= positions[:, None]  # (T, T)
    return jax.nn.dot_product_attention(q, k, v, mask=seen[None, None])


class Sequence(NamedTuple):
    """Where the T slots of a (B, T, ...) activation sit in the text, and the attention kernel
    that runs over them. The default is the text in order (`in_order`); context parallelism
    (`spmd.context`) lays the tokens out zigzag and attends with a ring. Rotary and GPT-2
    position embeddings read `positions`, so the model's result does not depend on the layout."""

    positions: jax.Array  # (T,) int: slot i holds the token at text position positions[i]
    attend: Callable = causal_attention  # (q, k, v, positions) -> (B, T, N, H)


def in_order(length: int, start: jax.Array | int = 0) -> Sequence:
    """`length` slots holding the text from position `start` on (generation starts later)."""
    return Sequence(jnp.arange(length) + start)


def rotary(x: jax.Array, theta: float, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half form, on (B, T, heads, H) whose
    slot i holds text position `positions[i]`."""
    h = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    # Exact integers in float32 below 2^24.
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values of every position generated so far, each (B, S, K, H) for one layer or
    (L, B, S, K, H) stacked like the blocks (scanned alongside them). Sharded as the keys and
    values are computed: batch over the data axes, K over `tensor` (`KV_NAMES`)."""

    k: jax.Array
    v: jax.Array


KV_NAMES = ("batch", None, "kv_heads", None)  # one layer's (B, S, K, H)


class Attention(nnx.Module):
    """Megatron: q/k/v are column-parallel (split over heads), the out-projection row-parallel.

    q, k and v share one fused weight laid out per key/value group, (D, K, G + 2, H): the G
    query heads of group k, then its key head, then its value head. Splitting K over `tensor`
    keeps every group whole on one shard, and one matmul means one partial input-gradient, so
    the backward pass all-reduces X once, not three times.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.init_std
        self.cfg, self.group = cfg, n // k
        self.wqkv = _param(rngs, std, (d, k, self.group + 2, h), ("embed", "kv_heads", None, None))
        # Scaled init of residual outputs (GPT-2): std / sqrt(2 L).
        self.wo = _param(rngs, std / (2 * cfg.n_layers) ** 0.5, (n, h, d), ("heads", None, "embed"))
        self.biases = cfg.style == "gpt2"
        if self.biases:
            self.bqkv = _const("bias", (k, self.group + 2, h), ("kv_heads", None, None))
            self.bo = _const("bias", (d,), ("embed",))

    def __call__(self, x, sequence: Sequence | None = None, cache: KVCache | None = None):
        """(B, T, D) → (B, T, D), causal self-attention over x laid out as `sequence` (default:
        in order from position 0).

        Generation passes this layer's `cache` (keys and values of every position so far) and
        x `in_order` from its first token's position: x's keys and values are written into the
        cache there, each query attends to the cached positions up to its own, and the result is
        (y, cache). Same projections, same rotary as training.
        """
        cfg, dt, g = self.cfg, self.cfg.dtype, self.group
        x = constrain(x, ("batch", "tokens", "embed"))  # sequence parallelism: all-gather T here
        with jax.named_scope("attn_qkv"):
            qkv = project("btd,dkch->btkch", x, self.wqkv)  # c = G + 2
            if self.biases:
                qkv = qkv + self.bqkv[...].astype(dt)
            qkv = constrain(qkv, ("batch", "tokens", "kv_heads", None, None))
            b, t = x.shape[:2]
            q = qkv[:, :, :, :g].reshape(b, t, cfg.n_heads, cfg.head_dim)  # heads k*G .. k*G+G-1
            k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # (B, T, K, H)
            sequence = sequence or in_order(t)
            if cfg.style == "llama":
                q, k = (rotary(a, cfg.rope_theta, sequence.positions) for a in (q, k))
        with jax.named_scope("attn_core"):
            if cache is None:
                o = sequence.attend(q, k, v, sequence.positions)  # (B, T, N, H)
            else:
                start, positions = sequence.positions[0], sequence.positions
                cache = KVCache(*(constrain(jax.lax.dynamic_update_slice_in_dim(c, new, start, 1),
                                            KV_NAMES) for c, new in zip(cache, (k, v))))
                # Query i sits at position start + i and sees cached positions 0 .. start + i.
                seen = jnp.arange(cache.k.shape[1])[None, :] <= positions[:, None]  # (T, S)
                o = jax.nn.dot_product_attention(q, cache.k, cache.v, mask=seen[None, None])
            o = constrain(o, ("batch", "tokens", "heads", None))
        with jax.named_scope("attn_out"):
            y = project("btnh,nhd->btd", o, self.wo)
            # Row-parallel output: all-reduce over `tensor` (reduce-scatter over T with SP).
            y = constrain(y, ("batch", "seq", "embed"))
            if self.biases:
                y = y + self.bo[...].astype(dt)
        return y if cache is None else (y, cache)


class MLP(nnx.Module):
    """Megatron: up/gate column-parallel (split over F), down-projection row-parallel.

    SwiGLU's gate and up weights are fused, (D, 2, F), for the same reason as q/k/v: one
    matmul, one backward all-reduce.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.cfg, self.gated = cfg, cfg.style == "llama"
        ins = 2 if self.gated else 1
        self.w_in = _param(rngs, std, (d, ins, f), ("embed", None, "mlp"))
        self.w_down = _param(rngs, std / (2 * cfg.n_layers) ** 0.5, (f, d), ("mlp", "embed"))
        self.biases = not self.gated
        if self.biases:
            self.b_in = _const("bias", (ins, f), (None, "mlp"))
            self.b_down = _const("bias", (d,), ("embed",))

    def __call__(self, x):  # (B, T, D)
        dt = self.cfg.dtype
        x = constrain(x, ("batch", "tokens", "embed"))  # sequence parallelism: all-gather T here
        with jax.named_scope("mlp_up"):
            up = project("btd,dcf->btcf", x, self.w_in)
            if self.biases:
                up = up + self.b_in[...].astype(dt)
            up = constrain(up, ("batch", "tokens", None, "mlp"))
            if self.gated:  # SwiGLU (Shazeer 2020): silu(gate) * up
                hid = jax.nn.silu(up[:, :, 0]) * up[:, :, 1]
            else:
                hid = jax.nn.gelu(up[:, :, 0])
            hid = constrain(hid, ("batch", "tokens", "mlp"))
        with jax.named_scope("mlp_down"):
            y = project("btf,fd->btd", hid, self.w_down)
            y = constrain(y, ("batch", "seq", "embed"))  # row-parallel: all-reduce / reduce-scatter
            if self.biases:
                y = y + self.b_down[...].astype(dt)
        return y


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm, self.attn = Norm(cfg), Attention(cfg, rngs)
        self.mlp_norm, self.mlp = Norm(cfg), MLP(cfg, rngs)

    def __call__(self, x, sequence: Sequence | None = None, cache: KVCache | None = None):
        """(B, T, D), sequence-sharded between blocks under SP; with a `cache` (generation),
        (x, cache): see `Attention`."""
        if cache is None:
            x = x + self.attn(self.attn_norm(x), sequence)
        else:
            y, cache = self.attn(self.attn_norm(x), sequence, cache)
            x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        x = constrain(x, ("batch", "seq", "embed"))
        return x if cache is None else (x, cache)


def scan_blocks(block_def, stacked: nnx.State, x: jax.Array, remat: bool = False,
                sequence: Sequence | None = None) -> jax.Array:
    """Apply blocks stacked on a leading axis with `lax.scan`: compile time does not grow with L.
    A plain function over split state (not `nnx.scan`), so any slice of the `layers` axis runs."""

    def one_block(x, layer_state):
        return nnx.merge(block_def, layer_state)(x, sequence)

    if remat:
        one_block = jax.checkpoint(one_block)
    return jax.lax.scan(lambda x, w: (one_block(x, w), None), x, stacked)[0]


class LMHead(nnx.Module):
    """Final norm + vocab-parallel output projection (the embedding's transpose when tied)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg, self.norm = cfg, Norm(cfg)
        tied = cfg.tie_embeddings
        self.w = None if tied else _param(rngs, cfg.init_std, (cfg.d_model, cfg.padded_vocab),
                                          ("embed", "vocab"))

    def __call__(self, x: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
        """(B, T, D) → (B, T, V) float32 logits; `embedding` (V, D) when tied."""
        with jax.named_scope("head"):
            x = constrain(self.norm(x), ("batch", "tokens", "embed"))
            w = embedding.T if self.w is None else self.w[...]
            logits = jnp.einsum("btd,dv->btv", x, w.astype(self.cfg.dtype))
            logits = constrain(logits.astype(jnp.float32), ("batch", "tokens", "vocab"))
            # Pad columns (vocab_size..V) can never be predicted.
            vocab_ids = jnp.arange(self.cfg.padded_vocab)
            return jnp.where(vocab_ids < self.cfg.vocab_size, logits, -1e30)


class Transformer(nnx.Module):
    """tokens → embed → blocks[L] (stacked, scanned) → final norm → head → logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        v, d = cfg.padded_vocab, cfg.d_model
        self.embedding = _param(rngs, cfg.init_std, (v, d), ("vocab", "embed"))
        if cfg.style == "gpt2":
            self.positions = _param(rngs, cfg.init_std, (cfg.max_seq_len, d), (None, "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.head = LMHead(cfg, rngs)

    def embed(self, tokens: jax.Array, sequence: Sequence | None = None) -> jax.Array:
        """(B, T) int → (B, T, D), the tokens laid out as `sequence` (default: in order)."""
        with jax.named_scope("embed"):
            # Vocab-parallel: each `tensor` shard looks up its rows, then one all-reduce
            # (reduce-scatter over T with sequence parallelism).
            x = constrain(jnp.take(self.embedding[...], tokens, axis=0), ("batch", "tokens", "embed"))
            if self.cfg.style == "gpt2":
                positions = (sequence or in_order(tokens.shape[1])).positions
                x = x + jnp.take(self.positions[...], positions, axis=0)
            return constrain(x.astype(self.cfg.dtype), ("batch", "seq", "embed"))

    def run_blocks(self, x: jax.Array, remat: bool = False,
                   sequence: Sequence | None = None) -> jax.Array:
        block_def, stacked = nnx.split(self.blocks)
        return scan_blocks(block_def, stacked, x, remat, sequence)

    def logits(self, x: jax.Array) -> jax.Array:  # (B, T, D) → (B, T, V) float32
        return self.head(x, self.embedding[...] if self.cfg.tie_embeddings else None)

    def __call__(self, tokens: jax.Array, remat: bool = False,
                 sequence: Sequence | None = None) -> jax.Array:
        """(B, T) tokens laid out as `sequence` (default: in order) → (B, T, V) logits."""
        return self.logits(self.run_blocks(self.embed(tokens, sequence), remat, sequence))

    def empty_cache(self, batch: int, length: int) -> KVCache:
        """A zero cache for `length` positions, stacked over the layers, (L, B, S, K, H): L as
        the blocks' stack holds them (with a pipeline's padding slots, `pipeline.layout`)."""
        cfg = self.cfg
        layers = jax.tree.leaves(nnx.state(self.blocks))[0].shape[0]
        shape = (layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        return KVCache(*(constrain(jnp.zeros(shape, cfg.dtype), (None, *KV_NAMES))
                         for _ in range(2)))

    def decode(self, tokens: jax.Array, cache: KVCache, start: jax.Array | int):
        """Generation: (B, T) tokens at positions start .. start + T - 1 → their (B, T, V)
        logits and the cache holding their keys and values too. One call over the prompt
        fills the cache (prefill); then one call per new token (T = 1) reads and appends to
        it. The cache's layer axis is scanned alongside the stacked blocks."""
        block_def, stacked = nnx.split(self.blocks)
        sequence = in_order(tokens.shape[1], start)

        def body(x, layer):
            layer_state, layer_cache = layer
            return nnx.merge(block_def, layer_state)(x, sequence, layer_cache)

        x, cache = jax.lax.scan(body, self.embed(tokens, sequence), (stacked, cache))
        return self.logits(x), cache


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy that works on vocab-sharded logits without gathering them.

    Every step is elementwise or a reduction over V, so with V split over `tensor` the compiler
    reduces only (B, T)-sized values across shards: the max, the sum of exponentials and the
    target logit (Megatron's vocab-parallel cross-entropy).
    """
    with jax.named_scope("loss"):
        shift = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
        log_z = jnp.log(jnp.exp(logits - shift).sum(-1)) + shift[..., 0]
        vocab_ids = jnp.arange(logits.shape[-1])
        target_logit = jnp.where(vocab_ids == targets[..., None], logits, 0.0).sum(-1)
        return (log_z - target_logit).mean()
