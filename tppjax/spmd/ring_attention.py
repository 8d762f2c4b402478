"""Context parallelism: causal attention with the sequence split over the `context` mesh axis.

Ring attention (Liu et al. 2023): each of the cp shards keeps its queries; keys and values go
around the ring, one hop per step, and each step's partial result is merged by an online
softmax (running max and sum of exponentials, as in FlashAttention). The sequence is laid out
zigzag (Llama 3's context parallelism): cut into 2·cp chunks, shard i holds chunks i and
2·cp−1−i, so every shard has the same causal work. The permutation is applied to tokens and
targets before the embedding (`ContextRing.permute`); the mean loss does not depend on token
order, and rotary / position embeddings read the true positions
(`models.transformer.sequence_hook`).

Written in the global view, T reshaped to (cp, T/cp) with the cp axis on `context`: a hop is
`jnp.roll` along it, which the partitioner compiles to one collective-permute. No `shard_map`,
so it nests in the pipeline's (manual over `stage`) as it is: on jax 0.10.2 a `shard_map`
manual over `context` inside it failed to lower once differentiated (its residuals were given
the outer manual axes too).

The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output and the log-sum-exp, and
runs the ring again: it recomputes each step's scores and passes dK, dV along with K, V; after
the last step they take one more hop home. So no ring step's K/V is stored.

Sends per attention call, E = elements of one shard's K (B/dp · T/cp · K/t · H), all float32
(with bfloat16 compute, XLA CPU widened K and V before sending them anyway; sending bfloat16
would halve the first two terms): forward 2·(cp−1) of 4·E (K and V); backward 2·(cp−1) of 4·E
(K, V again) and 2·cp of 4·E (dK, dV). `measure.analysis.ring_sends` is this closed form.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tppjax.models.transformer import constrain

# Logical names of the ring's arrays: C is the cp axis (`tokens`, on `context`), T here T/cp.
KV = ("batch", "tokens", None, "kv_heads", None)  # k, v: (B, C, T, K, H)
QUERIES = ("batch", "tokens", None, "kv_heads", None, None)  # q, o: (B, C, T, K, G, H)
PER_QUERY = ("batch", "tokens", "kv_heads", None, None)  # max, lse: (B, C, K, G, T)


def zigzag(length: int, shards: int) -> np.ndarray:
    """Slot j of the laid-out sequence holds token `zigzag(...)[j]`; shard i's slots are
    i·T/cp .. (i+1)·T/cp − 1 and hold chunks i and 2·cp−1−i of 2·cp equal chunks."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def _hop(x, names=KV):
    """One hop around the ring: shard i's block goes to shard i + 1 (a collective-permute)."""
    return constrain(jnp.roll(x, 1, axis=1), names)


def _scores(q, k, pos, hop):
    """Scaled scores (B, C, K, G, Tq, Tk) of q against the keys that arrived after `hop` hops
    (shard i then holds shard i − hop's), and the causal mask (C, Tq, Tk) by true positions."""
    s = jnp.einsum("bcqkgh,bcskh->bckgqs", q, k) / np.sqrt(q.shape[-1])
    k_pos = pos[(jnp.arange(pos.shape[0]) - hop) % pos.shape[0]]
    return s, (k_pos[:, None, :] <= pos[:, :, None])[None, :, None, None]


def _forward(q, k, v, pos):
    """float32 q (B, C, T, K, G, H), k and v (B, C, T, K, H) → (output like q, log-sum-exp)."""

    def merge(state, k, v, hop):
        m, total, acc = state
        s, mask = _scores(q, k, pos, hop)
        m_new = jnp.maximum(m, jnp.where(mask, s, -jnp.inf).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.exp(m - m_new)  # rescale what was summed under the old max
        acc = acc * fix[..., None] + jnp.einsum("bckgqs,bcskh->bckgqh", p, v)
        return (constrain(m_new, PER_QUERY), constrain(total * fix + p.sum(-1), PER_QUERY),
                constrain(acc, (*PER_QUERY, None)))

    # Hop 0 is each shard's own (diagonal) block: every query sees at least itself there, so
    # the running max is finite from then on.
    b, c, t, kh, g, h = q.shape
    start = (jnp.full((b, c, kh, g, t), -jnp.inf), jnp.zeros((b, c, kh, g, t)),
             jnp.zeros((b, c, kh, g, t, h)))
    state = merge(start, k, v, 0)

    def step(carry, hop):
        state, k, v = carry
        k, v = _hop(k), _hop(v)
        return (merge(state, k, v, hop), k, v), None

    (m, total, acc), _, _ = jax.lax.scan(step, (state, k, v), jnp.arange(1, c))[0]
    o = jnp.moveaxis(acc / total[..., None], -2, 2)  # (B, C, T, K, G, H)
    return constrain(o, QUERIES), m + jnp.log(total)


def _backward(q, k, v, o, lse, do, pos):
    """FlashAttention's backward, one ring step at a time; dK, dV travel with K, V."""
    delta = jnp.einsum("bcqkgh,bcqkgh->bckgq", do, o)

    def grads(k, v, hop):
        s, mask = _scores(q, k, pos, hop)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bcqkgh,bcskh->bckgqs", do, v)
        ds = p * (dp - delta[..., None]) / np.sqrt(q.shape[-1])
        return (constrain(jnp.einsum("bckgqs,bcskh->bcqkgh", ds, k), QUERIES),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", ds, q), KV),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", p, do), KV))

    dq, dk, dv = grads(k, v, 0)

    def step(carry, hop):
        dq, *moving = carry
        k, v, dk, dv = map(_hop, moving)
        gq, gk, gv = grads(k, v, hop)
        return (dq + gq, k, v, dk + gk, dv + gv), None

    dq, _, _, dk, dv = jax.lax.scan(step, (dq, k, v, dk, dv), jnp.arange(1, q.shape[1]))[0]
    if q.shape[1] > 1:  # the block held now is shard i + 1's: one more hop takes dK, dV home
        dk, dv = _hop(dk), _hop(dv)
    return dq, dk, dv


@functools.cache
def _ring_attention(order: tuple[int, ...], shards: int):
    """Attention over (B, T, N, H) q and (B, T, K, H) k, v laid out by `order`, with the
    custom backward that runs the ring again."""
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
        o, lse = _forward(split(q, k), split(k), split(v), jnp.asarray(pos))
        return o.reshape(q.shape).astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        dq, dk, dv = _backward(split(q, k), split(k), split(v), o, lse, split(do, k),
                               jnp.asarray(pos))
        return tuple(d.reshape(x.shape).astype(x.dtype) for d, x in ((dq, q), (dk, k), (dv, v)))

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
        """Causal attention of (B, T, N, H) queries, (B, T, K, H) keys and values."""
        order = tuple(int(i) for i in self.positions(q.shape[1]))
        return _ring_attention(order, self.shards)(q, k, v)


def ring(shards: int) -> ContextRing | None:
    """The hook for `shards` context shards; None (plain attention) for one."""
    return ContextRing(shards) if shards > 1 else None
