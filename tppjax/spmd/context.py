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
and take one more hop home at the end. So no step's K/V is stored. Hops are unrolled (cp is
small), so each hop's causal mask is a constant.

`measure.analysis.ring_sends` counts these sends in closed form; the census finds them.
"""

import dataclasses
import functools

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


def _sources(shards: int, hop: int) -> np.ndarray:
    """After `hop` hops shard i holds the block of shard i − hop."""
    return (np.arange(shards) - hop) % shards


def _pick(gathered, hop: int):
    """Each shard's block after `hop` hops, from all of K or V: a product with a (C shard,
    C block) one-hot, local to each shard (an indexed gather made the partitioner abort with
    `tensor` and `context` automatic inside a pipeline stage)."""
    blocks = np.eye(gathered.shape[1], dtype=np.float32)[_sources(gathered.shape[1], hop)]
    return constrain(jnp.einsum("bxtkh,cx->bctkh", gathered, blocks), KV)


def _scores(q, k, pos: np.ndarray, hop: int):
    """Scaled scores (B, C, K, G, Tq, Tk) of q against the keys that arrived after `hop` hops,
    and the causal mask (C, Tq, Tk) by true positions, a constant: hops are unrolled (cp is
    small), so nothing about positions is computed on the devices."""
    s = jnp.einsum("bcqkgh,bcskh->bckgqs", q, k) / np.sqrt(q.shape[-1])
    k_pos = pos[_sources(pos.shape[0], hop)]
    return s, (k_pos[:, None, :] <= pos[:, :, None])[None, :, None, None]


def _blocks_of(x, gathered: bool):
    """Each shard's K or V block at hops 0, 1, ..., cp − 1, one at a time: sent around the
    ring one hop at a time, or picked from all of it gathered once."""
    x_all = constrain(x, GATHERED) if gathered else None
    for hop in range(x.shape[1]):
        yield x
        if hop + 1 < x.shape[1]:
            x = _pick(x_all, hop + 1) if gathered else _hop(x)


def _forward(q, k, v, pos: np.ndarray, gathered: bool):
    """float32 q (B, C, T, K, G, H), k and v (B, C, T, K, H) → (output like q, log-sum-exp)."""
    b, c, t, kh, g, h = q.shape
    m, total, acc = (jnp.full((b, c, kh, g, t), -jnp.inf), jnp.zeros((b, c, kh, g, t)),
                     jnp.zeros((b, c, kh, g, t, h)))
    # Hop 0 is each shard's own (diagonal) block: every query sees at least itself there, so
    # the running max is finite from then on.
    for hop, (k_hop, v_hop) in enumerate(zip(_blocks_of(k, gathered), _blocks_of(v, gathered))):
        s, mask = _scores(q, k_hop, pos, hop)
        m_new = jnp.maximum(m, jnp.where(mask, s, -jnp.inf).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.exp(m - m_new)  # rescale what was summed under the old max
        acc = constrain(acc * fix[..., None] + jnp.einsum("bckgqs,bcskh->bckgqh", p, v_hop),
                        (*PER_QUERY, None))
        m, total = constrain(m_new, PER_QUERY), constrain(total * fix + p.sum(-1), PER_QUERY)
    o = jnp.moveaxis(acc / total[..., None], -2, 2)  # (B, C, T, K, G, H)
    return constrain(o, QUERIES), m + jnp.log(total)


def _backward(q, k, v, o, lse, do, pos: np.ndarray, gathered: bool):
    """FlashAttention's backward, one ring step at a time. dQ stays home; dK, dV of hop h
    belong to the shard the block came from: on the ring they travel with K, V and take one
    more hop home at the end; gathered, each shard adds them into a per-block buffer, summed
    over shards at the end (a reduce-scatter)."""
    delta = jnp.einsum("bcqkgh,bcqkgh->bckgq", do, o)
    c = q.shape[1]
    dq = jnp.zeros_like(q)
    dk = dv = jnp.zeros(k.shape[:2] + (c,) + k.shape[2:]) if gathered else jnp.zeros_like(k)
    for hop, (k_hop, v_hop) in enumerate(zip(_blocks_of(k, gathered), _blocks_of(v, gathered))):
        s, mask = _scores(q, k_hop, pos, hop)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bcqkgh,bcskh->bckgqs", do, v_hop)
        ds = p * (dp - delta[..., None]) / np.sqrt(q.shape[-1])
        dq = constrain(dq + jnp.einsum("bckgqs,bcskh->bcqkgh", ds, k_hop), QUERIES)
        if gathered:  # (B, C shard, C block, T, K, H): this hop's block is shard i − hop's
            blocks = np.eye(c, dtype=np.float32)[_sources(c, hop)]
            dk = constrain(dk + jnp.einsum("bckgqs,bcqkgh,cx->bcxskh", ds, q, blocks), PER_SHARD)
            dv = constrain(dv + jnp.einsum("bckgqs,bcqkgh,cx->bcxskh", p, do, blocks), PER_SHARD)
        else:
            if hop:
                dk, dv = _hop(dk), _hop(dv)
            dk = constrain(dk + jnp.einsum("bckgqs,bcqkgh->bcskh", ds, q), KV)
            dv = constrain(dv + jnp.einsum("bckgqs,bcqkgh->bcskh", p, do), KV)
    if gathered:  # each block's sums to the shard that holds it (an all-to-all), added there
        return dq, *(constrain(constrain(d, BY_BLOCK).sum(1), KV) for d in (dk, dv))
    if c > 1:  # the block held now is shard i + 1's: one more hop takes dK, dV home
        dk, dv = _hop(dk), _hop(dv)
    return dq, dk, dv


@functools.cache
def _ring_attention(order: tuple[int, ...], shards: int, gathered: bool):
    """Attention over (B, T, N, H) q and (B, T, K, H) k, v laid out by `order`, with the
    custom backward that moves K and V again."""
    pos = np.asarray(order).reshape(shards, -1)

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
        o, lse = _forward(split(q, k), split(k), split(v), pos, gathered)
        return o.reshape(q.shape).astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        dq, dk, dv = _backward(split(q, k), split(k), split(v), o, lse, split(do, k),
                               pos, gathered)
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
