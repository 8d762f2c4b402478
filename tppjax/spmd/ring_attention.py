"""Context parallelism: causal attention with the sequence split over the `context` mesh axis.

Ring attention (Liu et al. 2023): each of the cp shards keeps its queries; keys and values go
around the ring with `ppermute`, one hop per step, and each step's partial result is merged by
an online softmax (running max and sum of exponentials, as in FlashAttention). The sequence is
laid out zigzag (Llama 3's context parallelism): cut into 2·cp chunks, shard i holds chunks i
and 2·cp−1−i, so every shard has the same causal work. The permutation is applied to tokens and
targets before the embedding (`permute`); the mean loss does not depend on token order, and
rotary / position embeddings read the true positions (`models.transformer.sequence_hook`).

The backward pass (`jax.custom_vjp`) keeps only the shard's own q, k, v, output and log-sum-exp,
and runs the ring again: it recomputes each step's scores and passes dK, dV along with K, V;
after the last step they take one more hop home. So no ring step's K/V is stored.

Sends per attention call, E = elements of one shard's K (B/dp · T/cp · K/t · H), w its dtype's
bytes: forward 2·(cp−1) sends of E·w (K and V); backward 2·(cp−1) of E·w (K, V again) and
2·cp of E·4 (dK, dV, accumulated in float32). `measure.analysis.ring_sends` has the closed form.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from tppjax.spmd.rules import CONTEXT_AXIS as AXIS


def zigzag(length: int, shards: int) -> np.ndarray:
    """Slot j of the laid-out sequence holds token `zigzag(...)[j]`; shard i's slots are
    i·T/cp .. (i+1)·T/cp − 1 and hold chunks i and 2·cp−1−i of 2·cp equal chunks."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def _scores(q, k, q_pos, k_pos):
    """Scaled scores (B, K, G, Tq, Tk) of grouped queries (B, Tq, K, G, H) against keys
    (B, Tk, K, H), and the causal mask (Tq, Tk) from the tokens' true positions."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q, k) / np.sqrt(q.shape[-1])
    return s, k_pos[None, :] <= q_pos[:, None]


def _ring(x, shards: int):
    """Pass x one hop around the ring: shard i sends to shard i + 1."""
    return jax.lax.ppermute(x, AXIS, [(i, (i + 1) % shards) for i in range(shards)])


def _local(order: np.ndarray, shards: int):
    """This shard's index and the true positions of every shard's slots, (cp, T/cp)."""
    return jax.lax.axis_index(AXIS), jnp.asarray(order.reshape(shards, -1))


def _forward(q, k, v, order, shards):
    """Local (B, T/cp, K, G, H) float32 queries, (B, T/cp, K, H) keys and values →
    (output like q, log-sum-exp (B, K, G, T/cp))."""
    me, pos = _local(order, shards)

    def merge(state, k, v, source):
        m, total, acc = state
        s, mask = _scores(q, k, pos[me], pos[source])
        m_new = jnp.maximum(m, jnp.where(mask, s, -jnp.inf).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.exp(m - m_new)  # rescale what was summed under the old max
        return (m_new, total * fix + p.sum(-1),
                acc * fix[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", p, v))

    # Step 0 is the shard's own (diagonal) block: every query sees at least itself there, so
    # the running max is finite from then on.
    b, t, kh, g, _ = q.shape
    start = (jnp.full((b, kh, g, t), -jnp.inf), jnp.zeros((b, kh, g, t)),
             jnp.zeros((b, kh, g, t, q.shape[-1])))
    state = merge(start, k, v, me)

    def step(carry, hop):
        state, k, v = carry
        k, v = _ring(k, shards), _ring(v, shards)
        return (merge(state, k, v, (me - hop) % shards), k, v), None

    (m, total, acc), _, _ = jax.lax.scan(step, (state, k, v), jnp.arange(1, shards))[0]
    o = jnp.moveaxis(acc / total[..., None], 3, 1)  # (B, T/cp, K, G, H)
    return o, m + jnp.log(total)


def _backward(q, k, v, o, lse, do, order, shards):
    """FlashAttention's backward, one ring step at a time; dK, dV travel with K, V."""
    me, pos = _local(order, shards)
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", do, o)

    def grads(k, v, source):
        s, mask = _scores(q, k, pos[me], pos[source])
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        ds = p * (jnp.einsum("bqkgh,bskh->bkgqs", do, v) - delta[..., None]) / np.sqrt(q.shape[-1])
        return (jnp.einsum("bkgqs,bskh->bqkgh", ds, k), jnp.einsum("bkgqs,bqkgh->bskh", ds, q),
                jnp.einsum("bkgqs,bqkgh->bskh", p, do))

    dq, dk, dv = grads(k, v, me)

    def step(carry, hop):
        dq, k, v, dk, dv = (carry[0], *(_ring(x, shards) for x in carry[1:]))
        gq, gk, gv = grads(k, v, (me - hop) % shards)
        return (dq + gq, k, v, dk + gk, dv + gv), None

    dq, _, _, dk, dv = jax.lax.scan(step, (dq, k, v, dk, dv), jnp.arange(1, shards))[0]
    if shards > 1:  # the block held now is shard me + 1's: one more hop takes dK, dV home
        dk, dv = _ring(dk, shards), _ring(dv, shards)
    return dq, dk, dv


def _ring_attention(order: np.ndarray, shards: int):
    """The per-shard attention (inside `shard_map` over `context`), with its custom backward."""

    def grouped(q, k):  # (B, T, N, H) → float32 (B, T, K, G, H)
        b, t, n, h = q.shape
        return q.astype(jnp.float32).reshape(b, t, k.shape[2], n // k.shape[2], h)

    @jax.custom_vjp
    def attention(q, k, v):
        return fwd(q, k, v)[0]

    def fwd(q, k, v):
        f32 = [grouped(q, k), k.astype(jnp.float32), v.astype(jnp.float32)]
        o, lse = _forward(*f32, order, shards)
        return o.reshape(q.shape).astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        dq, dk, dv = _backward(grouped(q, k), k.astype(jnp.float32), v.astype(jnp.float32),
                               o, lse, grouped(do, k), order, shards)
        return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    attention.defvjp(fwd, bwd)
    return attention


@dataclasses.dataclass(frozen=True)
class ContextRing:
    """The `models.transformer.sequence_hook` for a mesh with `context` = shards > 1."""

    shards: int

    def positions(self, length: int) -> np.ndarray:
        return zigzag(length, self.shards)

    def permute(self, tokens: jax.Array) -> jax.Array:
        """(B, T) tokens or targets in the zigzag order."""
        return tokens[:, self.positions(tokens.shape[1])]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Causal attention of (B, T, N, H) queries, (B, T, K, H) keys and values, T split
        over `context`; batch and heads keep the shardings the compiler gave them."""
        spec = PartitionSpec(None, AXIS)
        ring = _ring_attention(self.positions(q.shape[1]), self.shards)
        return jax.shard_map(ring, in_specs=(spec,) * 3, out_specs=spec,
                             axis_names={AXIS})(q, k, v)


@functools.cache
def ring(shards: int) -> ContextRing | None:
    """The hook for `shards` context shards; None (plain attention) for one."""
    return ContextRing(shards) if shards > 1 else None
