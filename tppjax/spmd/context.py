"""Context parallelism: causal attention with the sequence split over the `context` mesh axis.

Ring attention (Liu et al. 2023): each of the cp shards keeps its queries; keys and values go
around the ring, one hop per step, and each step's partial result is merged by an online
softmax (running max and sum of exponentials, as in FlashAttention). The sequence is laid out
zigzag (Llama 3's context parallelism): cut into 2·cp chunks, shard i holds chunks i and
2·cp−1−i, so every shard has the same causal work. `Context.sequence` is that layout as the
model's `Sequence` (its positions, read by rotary and position embeddings, and this attention);
`Context.permute` puts tokens and targets in it. The mean loss does not depend on token order.

Written in the global view, T reshaped to (cp, T/cp) with the cp axis on `context`: a hop is
`jnp.roll` along it, which the partitioner compiles to one collective-permute, no `shard_map`.

Inside a pipeline a stage runs attention under its own `lax.cond` while the other stages run
something else, and XLA CPU's collective-permute waits for every device of the program (seen on
jax 0.10.2: "Expected 8 threads to join the rendezvous, but only 4"). Collectives with replica
groups (all-gather, reduce-scatter, all-to-all) wait only for their group, as the tensor
all-reduces inside a stage do. So in a pipeline each shard all-gathers K and V over `context`
once per call and takes hop h's block from there; the backward adds each hop's dK, dV into a
buffer per source block and sends each block's sums home at the end: the same bytes per call
as the ring ((cp−1) blocks of K and V forward; again, and (cp−1) of dK and dV, backward), but
all cp blocks of K and V are held during the call (never stored for the backward). Two ways:
- "manual": the pipeline's `shard_map` is manual over `context`, as over the data axes
  (`pipeline.executor.pipelined_loss`'s `sequence_axis`): each shard sees its T/cp slots, the
  sends are `all_gather` and `psum_scatter`, and the weight gradients are summed over `context`
  once per step with the data axes'.
- "gathered", where `tensor` splits the stages too: XLA gathers the operand of a collective over
  a manual axis whole on the automatic ones (here the heads, split over `tensor`), so `context`
  stays automatic, the global view all-gathers and an all-to-all sends dK, dV home; the loop
  then sums the weight gradients over `context` once per micro-batch (measured: README).

The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output and the log-sum-exp, and
moves K and V again: it recomputes each step's scores; on the ring dK, dV travel along with K, V
and take one more hop home at the end. So no step's K/V is stored. The hops are a `lax.scan`
(one block of K, V in flight); each hop's causal mask comes from shard indices (`_Here`).

`measure.analysis.ring_sends` counts these sends in closed form; the census finds them.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tppjax.models.transformer import Sequence, constrain
from tppjax.spmd.rules import CONTEXT_AXIS

# Logical names of the ring's arrays: C is the cp axis (`tokens`, on `context`), T here T/cp.
KV = ("batch", "tokens", None, "kv_heads", None)  # k, v: (B, C, T, K, H)
QUERIES = ("batch", "tokens", None, "kv_heads", None, None)  # q, o: (B, C, T, K, G, H)
PER_QUERY = ("batch", "tokens", "kv_heads", None, None)  # max, lse: (B, C, K, G, T)
# A shard's dK, dV for every block: (B, C shard, C block, T, K, H), summed over shards at the end.
PER_SHARD = ("batch", "tokens", None, None, "kv_heads", None)
BY_BLOCK = ("batch", None, "tokens", None, "kv_heads", None)  # the same, split by block
GATHERED = ("batch", None, None, "kv_heads", None)  # all of K or V on every context shard


def zigzag(length: int, shards: int) -> np.ndarray:
    """Slot j of the laid-out sequence holds token `zigzag(...)[j]`; shard i's slots are
    i·T/cp .. (i+1)·T/cp − 1 and hold chunks i and 2·cp−1−i of 2·cp equal chunks."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def _hop(x, names=KV):
    """One hop around the ring: shard i's block goes to shard i + 1 (a collective-permute)."""
    return constrain(jnp.roll(x, 1, axis=1), names)


class _Here(NamedTuple):
    """The context shards whose slots this code holds: all cp in the global view, or its own
    inside a `shard_map` manual over `context`. Positions and masks are computed from shard
    indices (iota arithmetic, no gather, no captured constant: XLA's partitioner aborted on a
    gather of positions, and Shardy refused a constant operand of a nested `shard_map`)."""

    shards: jax.Array  # (S,) int: their indices
    cp: int  # context shards in all
    chunk: int  # slots per zigzag chunk: T / (2·cp)

    def positions(self, shards: jax.Array) -> jax.Array:
        """(S, 2·chunk) text positions of the slots of `shards` (`zigzag`)."""
        j, i = jnp.arange(2 * self.chunk), shards[:, None]
        return jnp.where(j < self.chunk, i * self.chunk + j,
                         (2 * self.cp - 2 - i) * self.chunk + j)

    def hop(self, h):
        """After `h` hops shard i holds shard i − h's block: the causal mask (S, Tq, Tk) of its
        queries against those keys, and (S, cp) one-hot of whose block it is."""
        source = (self.shards - h) % self.cp
        mask = self.positions(source)[:, None, :] <= self.positions(self.shards)[:, :, None]
        return mask, jax.nn.one_hot(source, self.cp)


def _here(mode: str, shards: int, length: int) -> _Here:
    """`_Here` for a sequence of `length` slots in all: every shard, or with `mode` "manual"
    (inside a `shard_map` manual over `context`) this one."""
    ids = jax.lax.axis_index(CONTEXT_AXIS)[None] if mode == "manual" else jnp.arange(shards)
    return _Here(ids, shards, length // (2 * shards))


def _next(k, v, k_all, v_all, blocks):
    """The next hop's K and V blocks: around the ring, or picked from all of them (`k_all`,
    gathered once) by a product with the one-hot `blocks`, local to each shard."""
    if k_all is None:
        return _hop(k), _hop(v)
    return tuple(constrain(jnp.einsum("bxtkh,cx->bctkh", a, blocks), KV) for a in (k_all, v_all))


def _gathered(k, v, mode: str):
    """All of K and V on every context shard (one all-gather each), or (None, None) on the
    ring."""
    if mode == "manual":
        return tuple(jax.lax.all_gather(a, CONTEXT_AXIS, axis=1, tiled=True) for a in (k, v))
    return (constrain(k, GATHERED), constrain(v, GATHERED)) if mode == "gathered" else (None, None)


def _scores(q, k, mask):
    """Scaled scores (B, C, K, G, Tq, Tk) of q against one hop's keys, and its mask."""
    s = jnp.einsum("bcqkgh,bcskh->bckgqs", q, k) / np.sqrt(q.shape[-1])
    return s, mask[None, :, None, None]


def _forward(q, k, v, here: _Here, mode: str):
    """float32 q (B, C, T, K, G, H), k and v (B, C, T, K, H) → (output like q, log-sum-exp)."""

    def merge(state, k, v, mask):
        m, total, acc = state
        s, mask = _scores(q, k, mask)
        m_new = jnp.maximum(m, jnp.where(mask, s, -jnp.inf).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.exp(m - m_new)  # rescale what was summed under the old max
        acc = acc * fix[..., None] + jnp.einsum("bckgqs,bcskh->bckgqh", p, v)
        return (constrain(m_new, PER_QUERY), constrain(total * fix + p.sum(-1), PER_QUERY),
                constrain(acc, (*PER_QUERY, None)))

    k_all, v_all = _gathered(k, v, mode)

    def step(carry, h):
        state, k, v = carry
        mask, blocks = here.hop(h)
        k, v = _next(k, v, k_all, v_all, blocks)
        return (merge(state, k, v, mask), k, v), None

    # Hop 0 is each shard's own (diagonal) block: every query sees at least itself there, so
    # the running max is finite from then on.
    b, c, t, kh, g, h = q.shape
    start = (jnp.full((b, c, kh, g, t), -jnp.inf), jnp.zeros((b, c, kh, g, t)),
             jnp.zeros((b, c, kh, g, t, h)))
    state = merge(start, k, v, here.hop(0)[0])
    m, total, acc = jax.lax.scan(step, (state, k, v), jnp.arange(1, here.cp))[0][0]
    o = jnp.moveaxis(acc / total[..., None], -2, 2)  # (B, C, T, K, G, H)
    return constrain(o, QUERIES), m + jnp.log(total)


def _backward(q, k, v, o, lse, do, here: _Here, mode: str):
    """FlashAttention's backward, one ring step at a time. dQ stays home; dK, dV of a hop
    belong to the shard its block came from: on the ring they travel with K, V and take one
    more hop home at the end; gathered, each shard adds them into a buffer per source block,
    and each block's sums go home at the end (an all-to-all, or manual a reduce-scatter)."""
    delta = jnp.einsum("bcqkgh,bcqkgh->bckgq", do, o)

    def grads(k, v, mask):
        s, mask = _scores(q, k, mask)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bcqkgh,bcskh->bckgqs", do, v)
        ds = p * (dp - delta[..., None]) / np.sqrt(q.shape[-1])
        return (constrain(jnp.einsum("bckgqs,bcskh->bcqkgh", ds, k), QUERIES),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", ds, q), KV),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", p, do), KV))

    def into_block(d, blocks):  # (B, C, T, K, H) → (B, C shard, C block, T, K, H)
        return d if mode == "ring" else \
            constrain(jnp.einsum("bctkh,cx->bcxtkh", d, blocks), PER_SHARD)

    k_all, v_all = _gathered(k, v, mode)

    def step(carry, h):
        dq, k, v, dk, dv = carry
        mask, blocks = here.hop(h)
        k, v = _next(k, v, k_all, v_all, blocks)
        if mode == "ring":
            dk, dv = _hop(dk), _hop(dv)
        gq, gk, gv = grads(k, v, mask)
        return (dq + gq, k, v, dk + into_block(gk, blocks), dv + into_block(gv, blocks)), None

    mask, blocks = here.hop(0)
    dq, dk, dv = grads(k, v, mask)
    dk, dv = into_block(dk, blocks), into_block(dv, blocks)
    dq, _, _, dk, dv = jax.lax.scan(step, (dq, k, v, dk, dv), jnp.arange(1, here.cp))[0]
    if mode == "manual":  # every shard's sums for block i, added on shard i: a reduce-scatter
        return dq, *(jax.lax.psum_scatter(d, CONTEXT_AXIS, scatter_dimension=2, tiled=True)
                     [:, :, 0] for d in (dk, dv))
    if mode == "gathered":  # the same by an all-to-all (resplit by block), added there
        return dq, *(constrain(constrain(d, BY_BLOCK).sum(1), KV) for d in (dk, dv))
    if q.shape[1] > 1:  # the block held now is shard i + 1's: one more hop takes dK, dV home
        dk, dv = _hop(dk), _hop(dv)
    return dq, dk, dv


@functools.cache
def _ring_attention(length: int, shards: int, mode: str):
    """Attention over (B, T, N, H) q and (B, T, K, H) k, v laid out zigzag (`length` slots in
    all), with the custom backward that moves K and V again. `mode`: "ring", "gathered" or
    "manual" (the module docstring; manual: each shard holds its T/cp slots)."""
    c = 1 if mode == "manual" else shards  # the context blocks this code sees

    def split(x, k=None):  # (B, T, heads, H) → (B, C, T/C, K[, G], H); queries in float32
        b, t, n, h = x.shape
        if k is None:  # float32 on the ring: XLA CPU widened bf16 K, V before the send anyway
            return constrain(x.astype(jnp.float32).reshape(b, c, t // c, n, h), KV)
        g = n // k.shape[2]
        return constrain(x.astype(jnp.float32).reshape(b, c, t // c, n // g, g, h), QUERIES)

    def forward(q, k, v):  # → output (B, T, N, H) float32, log-sum-exp (B, C, K, G, T/C)
        o, lse = _forward(split(q, k), split(k), split(v), _here(mode, shards, length), mode)
        return o.reshape(q.shape), lse

    def backward(q, k, v, o, lse, do):
        grads = _backward(split(q, k), split(k), split(v), split(o, k), lse, split(do, k),
                          _here(mode, shards, length), mode)
        return tuple(d.reshape(x.shape) for d, x in zip(grads, (q, k, v), strict=True))

    @jax.custom_vjp
    def attention(q, k, v):
        return fwd(q, k, v)[0]

    def fwd(q, k, v):
        o, lse = forward(q, k, v)
        return o.astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        grads = backward(q, k, v, o, lse, do)
        return tuple(d.astype(x.dtype) for d, x in zip(grads, (q, k, v), strict=True))

    attention.defvjp(fwd, bwd)
    return attention


def _manual() -> bool:
    """Whether this code runs inside a `shard_map` manual over `context` (a pipeline's)."""
    return CONTEXT_AXIS in jax.sharding.get_abstract_mesh().manual_axes


@dataclasses.dataclass(frozen=True)
class Context:
    """Context parallelism over `shards` > 1 context shards. `gathered`: inside pipeline stages
    that `tensor` splits too (the module docstring)."""

    shards: int
    gathered: bool = False

    def sequence(self, length: int) -> Sequence:
        """The zigzag layout of the `length` slots this code sees, attended by the ring: all of
        them, or inside a `shard_map` manual over `context` this shard's."""
        if not _manual():
            return Sequence(zigzag(length, self.shards), self.attend)
        here = _here("manual", self.shards, length * self.shards)
        return Sequence(here.positions(here.shards)[0], self.attend)

    @property
    def pipeline_axis(self) -> str | None:
        """The mesh axis a pipeline's `shard_map` makes manual for it (`context`), or None where
        it stays automatic there (`gathered`)."""
        return None if self.gathered else CONTEXT_AXIS

    def permute(self, tokens: jax.Array) -> jax.Array:
        """(B, T) tokens or targets in the zigzag order."""
        return tokens[:, zigzag(tokens.shape[1], self.shards)]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions) -> jax.Array:
        """Causal attention of (B, T, N, H) queries, (B, T, K, H) keys and values laid out by
        `sequence` (`positions`: its positions, implied by the zigzag layout)."""
        if _manual():
            return _ring_attention(q.shape[1] * self.shards, self.shards, "manual")(q, k, v)
        mode = "gathered" if self.gathered else "ring"
        return _ring_attention(q.shape[1], self.shards, mode)(q, k, v)


def context(mesh_shape) -> Context | None:
    """Context parallelism for a mesh of these axis sizes; None for one context shard.
    Gathered in the global view inside pipeline stages that `tensor` splits too."""
    shards = mesh_shape.get(CONTEXT_AXIS, 1)
    if shards == 1:
        return None
    return Context(shards, gathered=mesh_shape.get("stage", 1) > 1
                   and mesh_shape.get("tensor", 1) > 1)
