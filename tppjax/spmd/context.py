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
groups (all-gather, all-to-all) wait only for their group, as the tensor all-reduces inside a
stage do. So with `stage` > 1 (`gathered`), each shard all-gathers K and V over `context` once
and takes hop h's block from there; the backward adds each hop's dK, dV into a buffer per
source block and one all-to-all sends each block's sum home: the same bytes per attention call
as the ring ((cp−1) blocks of K and V forward; again, and (cp−1) of dK and dV, backward), but
all cp blocks of K and V are held during the call (never stored for the backward).

The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output and the log-sum-exp, and
moves K and V again: it recomputes each step's scores; on the ring dK, dV travel along with K, V
and take one more hop home at the end. So no step's K/V is stored. The hops are a `lax.scan`
(one block of K, V in flight) over constants: each hop's causal mask and source block.

`measure.analysis.ring_sends` counts these sends in closed form; the census finds them.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tppjax.models.transformer import Sequence, constrain

# Logical names of the ring's arrays: C is the cp axis (`tokens`, on `context`), T here T/cp.
KV = ("batch", "tokens", None, "kv_heads", None)  # k, v: (B, C, T, K, H)
QUERIES = ("batch", "tokens", None, "kv_heads", None, None)  # q, o: (B, C, T, K, G, H)
PER_QUERY = ("batch", "tokens", "kv_heads", None, None)  # max, lse: (B, C, K, G, T)
GATHERED = ("batch", None, None, "kv_heads", None)  # all of K or V on every context shard
# A shard's dK, dV for every block: (B, C shard, C block, T, K, H), summed over shards at the end.
PER_SHARD = ("batch", "tokens", None, None, "kv_heads", None)
BY_BLOCK = ("batch", None, "tokens", None, "kv_heads", None)  # the same, split by block


def zigzag(length: int, shards: int) -> np.ndarray:
    """Slot j of the laid-out sequence holds token `zigzag(...)[j]`; shard i's slots are
    i·T/cp .. (i+1)·T/cp − 1 and hold chunks i and 2·cp−1−i of 2·cp equal chunks."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def _hop(x, names=KV):
    """One hop around the ring: shard i's block goes to shard i + 1 (a collective-permute)."""
    return constrain(jnp.roll(x, 1, axis=1), names)


class _Hops(NamedTuple):
    """Constants of each hop h = 0 .. cp − 1 (after h hops shard i holds shard i − h's block),
    scanned over with the hops: nothing about positions is computed on the devices."""

    mask: np.ndarray  # (cp, C, Tq, Tk) bool: the keys each query sees, by true positions
    blocks: np.ndarray  # (cp, C shard, C block) float32 one-hot: whose block each shard holds


def _hops(pos: np.ndarray) -> _Hops:
    """`_Hops` of the layout `pos` (C, T/C): the text position of every slot."""
    c = pos.shape[0]
    sources = [(np.arange(c) - h) % c for h in range(c)]
    return _Hops(np.stack([pos[src][:, None, :] <= pos[:, :, None] for src in sources]),
                 np.stack([np.eye(c, dtype=np.float32)[src] for src in sources]))


def _next(k, v, k_all, v_all, blocks):
    """The next hop's K and V blocks: around the ring, or picked from all of them (`k_all`
    gathered once) by a product with the one-hot `blocks`, local to each shard (an indexed
    gather made the partitioner abort with `tensor` and `context` automatic inside a stage)."""
    if k_all is None:
        return _hop(k), _hop(v)
    return tuple(constrain(jnp.einsum("bxtkh,cx->bctkh", a, blocks), KV) for a in (k_all, v_all))


def _gathered(k, v, gathered: bool):
    """All of K and V on every context shard (one all-gather each), or (None, None)."""
    return (constrain(k, GATHERED), constrain(v, GATHERED)) if gathered else (None, None)


def _scores(q, k, mask):
    """Scaled scores (B, C, K, G, Tq, Tk) of q against one hop's keys, and its mask."""
    s = jnp.einsum("bcqkgh,bcskh->bckgqs", q, k) / np.sqrt(q.shape[-1])
    return s, mask[None, :, None, None]


def _forward(q, k, v, hops: _Hops, gathered: bool):
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

    k_all, v_all = _gathered(k, v, gathered)

    def step(carry, hop):
        state, k, v = carry
        k, v = _next(k, v, k_all, v_all, hop.blocks)
        return (merge(state, k, v, hop.mask), k, v), None

    # Hop 0 is each shard's own (diagonal) block: every query sees at least itself there, so
    # the running max is finite from then on.
    b, c, t, kh, g, h = q.shape
    start = (jnp.full((b, c, kh, g, t), -jnp.inf), jnp.zeros((b, c, kh, g, t)),
             jnp.zeros((b, c, kh, g, t, h)))
    state = merge(start, k, v, hops.mask[0])
    m, total, acc = jax.lax.scan(step, (state, k, v), _Hops(*(a[1:] for a in hops)))[0][0]
    o = jnp.moveaxis(acc / total[..., None], -2, 2)  # (B, C, T, K, G, H)
    return constrain(o, QUERIES), m + jnp.log(total)


def _backward(q, k, v, o, lse, do, hops: _Hops, gathered: bool):
    """FlashAttention's backward, one ring step at a time. dQ stays home; dK, dV of a hop
    belong to the shard its block came from: on the ring they travel with K, V and take one
    more hop home at the end; gathered, each shard adds them into a buffer per source block,
    and one all-to-all sends each block's sums home."""
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
        return constrain(jnp.einsum("bctkh,cx->bcxtkh", d, blocks), PER_SHARD) if gathered \
            else d

    k_all, v_all = _gathered(k, v, gathered)

    def step(carry, hop):
        dq, k, v, dk, dv = carry
        k, v = _next(k, v, k_all, v_all, hop.blocks)
        if not gathered:
            dk, dv = _hop(dk), _hop(dv)
        gq, gk, gv = grads(k, v, hop.mask)
        return (dq + gq, k, v, dk + into_block(gk, hop.blocks),
                dv + into_block(gv, hop.blocks)), None

    dq, dk, dv = grads(k, v, hops.mask[0])
    dk, dv = into_block(dk, hops.blocks[0]), into_block(dv, hops.blocks[0])
    dq, _, _, dk, dv = jax.lax.scan(step, (dq, k, v, dk, dv), _Hops(*(a[1:] for a in hops)))[0]
    if gathered:  # each block's sums to the shard that holds it (an all-to-all), added there
        return dq, *(constrain(constrain(d, BY_BLOCK).sum(1), KV) for d in (dk, dv))
    if q.shape[1] > 1:  # the block held now is shard i + 1's: one more hop takes dK, dV home
        dk, dv = _hop(dk), _hop(dv)
    return dq, dk, dv


@functools.cache
def _ring_attention(order: tuple[int, ...], shards: int, gathered: bool):
    """Attention over (B, T, N, H) q and (B, T, K, H) k, v laid out by `order`, with the
    custom backward that moves K and V again."""
    hops = _hops(np.asarray(order).reshape(shards, -1))

    def split(x, k=None):  # (B, T, heads, H) → (B, C, T/C, K[, G], H); queries in float32
        b, t, n, h = x.shape
        if k is None:  # float32 on the ring: XLA CPU widened bf16 K, V before the send anyway
            return constrain(x.astype(jnp.float32).reshape(b, shards, t // shards, n, h), KV)
        g = n // k.shape[2]
        return constrain(x.astype(jnp.float32).reshape(b, shards, t // shards, n // g, g, h),
                         QUERIES)

    @jax.custom_vjp
    def attention(q, k, v):
        return fwd(q, k, v)[0]

    def fwd(q, k, v):
        o, lse = _forward(split(q, k), split(k), split(v), hops, gathered)
        return o.reshape(q.shape).astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        dq, dk, dv = _backward(split(q, k), split(k), split(v), o, lse, split(do, k),
                               hops, gathered)
        return tuple(d.reshape(x.shape).astype(x.dtype) for d, x in ((dq, q), (dk, k), (dv, v)))

    attention.defvjp(fwd, bwd)
    return attention


@dataclasses.dataclass(frozen=True)
class Context:
    """Context parallelism over `shards` > 1 context shards; `gathered` inside a pipeline."""

    shards: int
    gathered: bool = False

    def sequence(self, length: int) -> Sequence:
        """The zigzag layout of `length` slots, attended by the ring."""
        return Sequence(zigzag(length, self.shards), self.attend)

    def permute(self, tokens: jax.Array) -> jax.Array:
        """(B, T) tokens or targets in the zigzag order."""
        return tokens[:, zigzag(tokens.shape[1], self.shards)]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions) -> jax.Array:
        """Causal attention of (B, T, N, H) queries, (B, T, K, H) keys and values whose slot i
        holds text position `positions[i]` (a constant: the layout is fixed)."""
        order = tuple(int(i) for i in np.asarray(positions))
        return _ring_attention(order, self.shards, self.gathered)(q, k, v)


def context(shards: int, stages: int) -> Context | None:
    """Context parallelism for a mesh's `context` and `stage` sizes; None for one shard."""
    return Context(shards, gathered=stages > 1) if shards > 1 else None
