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
groups (all-gather, reduce-scatter) wait only for their group, as the tensor all-reduces inside
a stage do. So with `stage` > 1 (`gathered`), each shard all-gathers K and V over `context` once
and takes hop h's block from there, and the backward reduce-scatters dK, dV: the same bytes per
attention call as the ring's forward ((cp−1) blocks of K and V), no more in the backward, but
all cp blocks of K and V are held during the call (not stored for the backward).

The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output and the log-sum-exp, and
moves K and V again: it recomputes each step's scores; on the ring dK, dV travel along with K, V
and take one more hop home at the end. So no step's K/V is stored.

Sends per attention call, E = elements of one shard's K (B/dp · T/cp · K/t · H), all float32
(with bfloat16 compute, XLA CPU widened K and V before sending them anyway): the ring forward
2·(cp−1) of 4·E (K and V), backward 2·(cp−1) of 4·E (K, V again) and 2·cp of 4·E (dK, dV);
gathered, each shard receives 2·(cp−1)·4·E forward and 2·(cp−1)·4·E + 2·(cp−1)·4·E backward
(K, V, then dK, dV). `measure.analysis.ring_sends` is this closed form.
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


def zigzag(length: int, shards: int) -> np.ndarray:
    """Slot j of the laid-out sequence holds token `zigzag(...)[j]`; shard i's slots are
    i·T/cp .. (i+1)·T/cp − 1 and hold chunks i and 2·cp−1−i of 2·cp equal chunks."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def _hop(x, names=KV):
    """One hop around the ring: shard i's block goes to shard i + 1 (a collective-permute)."""
    return constrain(jnp.roll(x, 1, axis=1), names)


def _sources(shards: int, hop) -> jax.Array:
    """After `hop` hops shard i holds the block of shard i − hop."""
    return (jnp.arange(shards) - hop) % shards


def _blocks(shards: int, hop) -> jax.Array:
    """(C shard, C block) one-hot: after `hop` hops shard i works on block i − hop."""
    return jax.nn.one_hot(_sources(shards, hop), shards)


def _pick(gathered, hop):
    """Each shard's block after `hop` hops, from all of K or V (a local product, no send)."""
    return constrain(jnp.einsum("bxtkh,cx->bctkh", gathered, _blocks(gathered.shape[1], hop)),
                     KV)


def _scores(q, k, pos, hop):
    """Scaled scores (B, C, K, G, Tq, Tk) of q against the keys that arrived after `hop` hops,
    and the causal mask (C, Tq, Tk) by true positions (float32 `pos`: exact below 2^24)."""
    s = jnp.einsum("bcqkgh,bcskh->bckgqs", q, k) / np.sqrt(q.shape[-1])
    k_pos = _blocks(pos.shape[0], hop) @ pos  # a product, not a gather: the partitioner
    # aborted on a gather here with `tensor` and `context` automatic inside a pipeline stage
    return s, (k_pos[:, None, :] <= pos[:, :, None])[None, :, None, None]


def _forward(q, k, v, pos, gathered: bool):
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
    if gathered:
        k_all, v_all = constrain(k, GATHERED), constrain(v, GATHERED)

        def step(state, hop):
            return merge(state, *(_pick(a, hop) for a in (k_all, v_all)), hop), None

        m, total, acc = jax.lax.scan(step, state, jnp.arange(1, c))[0]
    else:
        def step(carry, hop):
            state, k, v = carry
            k, v = _hop(k), _hop(v)
            return (merge(state, k, v, hop), k, v), None

        m, total, acc = jax.lax.scan(step, (state, k, v), jnp.arange(1, c))[0][0]
    o = jnp.moveaxis(acc / total[..., None], -2, 2)  # (B, C, T, K, G, H)
    return constrain(o, QUERIES), m + jnp.log(total)


def _backward(q, k, v, o, lse, do, pos, gathered: bool):
    """FlashAttention's backward, one ring step at a time."""
    delta = jnp.einsum("bcqkgh,bcqkgh->bckgq", do, o)

    def grads(k, v, hop):
        s, mask = _scores(q, k, pos, hop)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bcqkgh,bcskh->bckgqs", do, v)
        ds = p * (dp - delta[..., None]) / np.sqrt(q.shape[-1])
        return (constrain(jnp.einsum("bckgqs,bcskh->bcqkgh", ds, k), QUERIES),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", ds, q), KV),
                constrain(jnp.einsum("bckgqs,bcqkgh->bcskh", p, do), KV))

    c = q.shape[1]
    dq, dk, dv = grads(k, v, 0)
    if gathered:  # each shard sums its dK, dV per source block; one reduce-scatter at the end
        k_all, v_all = constrain(k, GATHERED), constrain(v, GATHERED)

        def into_block(d, hop):  # (B, C, T, K, H) → (B, C shard, C block, T, K, H)
            return constrain(jnp.einsum("bctkh,cx->bcxtkh", d, _blocks(c, hop)), PER_SHARD)

        def step(carry, hop):
            dq, dk, dv = carry
            gq, gk, gv = grads(*(_pick(a, hop) for a in (k_all, v_all)), hop)
            return (dq + gq, dk + into_block(gk, hop), dv + into_block(gv, hop)), None

        dq, dk, dv = jax.lax.scan(step, (dq, into_block(dk, 0), into_block(dv, 0)),
                                  jnp.arange(1, c))[0]
        return dq, constrain(dk.sum(1), KV), constrain(dv.sum(1), KV)

    def step(carry, hop):
        dq, *moving = carry
        k, v, dk, dv = map(_hop, moving)
        gq, gk, gv = grads(k, v, hop)
        return (dq + gq, k, v, dk + gk, dv + gv), None

    dq, _, _, dk, dv = jax.lax.scan(step, (dq, k, v, dk, dv), jnp.arange(1, c))[0]
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
        o, lse = _forward(split(q, k), split(k), split(v), jnp.asarray(pos, jnp.float32), gathered)
        return o.reshape(q.shape).astype(q.dtype), (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        dq, dk, dv = _backward(split(q, k), split(k), split(v), o, lse, split(do, k),
                               jnp.asarray(pos, jnp.float32), gathered)
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
