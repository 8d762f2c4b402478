"""GPipe over the `stage` mesh axis: a forward tick loop that `jax.grad` differentiates.

Symbols: L layers, p stages (the `stage` axis), m micro-batches, b_mb = b/m.
Stage s holds layers [s·L/p, (s+1)·L/p). At tick t (0 ≤ t < m + p − 1) stage s runs micro-batch
t − s when 0 ≤ t − s < m, and is idle otherwise; a `ppermute` hands each stage's output to the
next stage for the following tick. Idle fraction per stage: (p − 1)/(m + p − 1) (Huang et al.
2019). Autodiff of the loop gives all-forward-then-all-backward, so activations of all m
micro-batches are alive at once (memory grows with m; see the 1F1B executor for the fix).

The `shard_map` is manual over `stage` and the data-parallel axes (`data`, `fsdp`), automatic
over `tensor`: the Megatron constraints inside every block (and sequence parallelism) keep
working per stage, while each data shard runs its own copy of the loop. Being manual over the
data axes is what keeps the data-parallel work out of the tick loop: a stage's weights enter the
loop whole (under FSDP: one all-gather per step, not per micro-batch) and their gradients leave
it as per-shard partial sums, reduced once per step at the boundary, not once per tick.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from tppjax.pipeline.layout import ACTIVE_SCOPE

DP = ("data", "fsdp")  # the mesh axes that split the batch by default (tppjax.spmd.rules)


def vary(tree):
    """Mark values as varying over every manual mesh axis (they differ per stage and per data
    shard), as shard_map's type check needs for scan carries, `lax.cond`/`lax.switch` results and
    `jax.vjp` cotangents; a no-op on axes where they already vary."""
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)

    def one(x):
        missing = tuple(a for a in manual if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def widen(x: jax.Array) -> jax.Array:
    """`x` in at least float32, for a sum over a manual axis (`psum`, or the transpose of `vary`).

    XLA's CPU backend aborts on a bfloat16 all-reduce inside a `shard_map` that leaves a mesh
    axis automatic ("Invalid binary instruction opcode copy", jax 0.10.2: its AllReducePromotion
    pass rebuilds the reduction region, which JAX lowers with a sharding annotation). These sums
    cross the manual boundary once per step, not per tick, so doing them in float32 is cheap.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def to_stages(stacked, stages: int):
    """[L, ...] → [p, L/p, ...]: layer l goes to stage l // (L/p). Exactly undone by `from_stages`.

    The canonical layout is already split contiguously over `stage` (spmd.rules), so this reshape
    moves no data.
    """
    return jax.tree.map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]), stacked)


def from_stages(staged):
    """[p, L/p, ...] → [L, ...]."""
    return jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), staged)


def to_microbatches(x: jax.Array, m: int) -> jax.Array:
    """(B, ...) → (m, B/m, ...), micro-batch i = rows i, i + m, i + 2m, ...

    Strided, not contiguous, so that every data shard holds b_mb/d rows of every micro-batch:
    splitting a data-sharded batch this way moves nothing.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def apply_layer(layer, state, x: jax.Array) -> jax.Array:
    """One layer on x: `layer` is an `nnx.GraphDef` (merged with `state`, its parameters) or a
    plain function (params, x) -> y (the pipeline API takes either)."""
    if isinstance(layer, nnx.GraphDef):
        return nnx.merge(layer, state)(x)
    return layer(state, x)


def stage_function(block_def, remat: str):
    """One stage's forward: its L/p layers under `lax.scan`, with the chosen recomputation.

    remat "none": store every layer's intermediates; "layer": keep each layer's input, recompute
    inside the layer; "stage": keep only the stage input, recompute the whole stage.
    """

    def one_layer(x, layer_state):
        return apply_layer(block_def, layer_state, x)

    if remat == "layer":
        one_layer = jax.checkpoint(one_layer)

    def run(params, x, active=None):
        if active is None:
            return jax.lax.scan(lambda x, w: (one_layer(x, w), None), x, params)[0]

        def slot(x, layer):  # a padding slot (active False) is skipped: no FLOPs
            w, on = layer
            return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(one_layer), lambda x, _: x,
                                x, w), None

        return jax.lax.scan(slot, x, (params, active))[0]

    return jax.checkpoint(run) if remat == "stage" else run


def gpipe(block_def, staged, xs: jax.Array, remat: str = "none",
          active=None, sequence_axis: str | None = None) -> jax.Array:
    """Run micro-batches `xs` (m, b_mb, T, D) through all stages; returns the last stage's outputs.
    `active`: [p, L/p] bools, False for a padding slot that is skipped (`pipeline.layout`).
    `sequence_axis`: a mesh axis that splits T, manual like the data axes
    (`pipeline.executor.pipelined_loss`).

    If p divides m the outputs come back split over `stage` along m (a reduce-scatter), so the
    head and loss after the loop run once, not p times; otherwise they are summed to every stage.
    """
    p = jax.tree.leaves(staged)[0].shape[0]
    m = xs.shape[0]
    run_stage = stage_function(block_def, remat)
    scatter = m % p == 0

    @functools.partial(
        jax.shard_map, in_specs=(P("stage"), P(None, DP, sequence_axis)),
        out_specs=P("stage" if scatter else None, DP, sequence_axis),
        axis_names={"stage", *DP, *([sequence_axis] if sequence_axis else [])},
    )
    def loop(staged, xs):
        # This stage's [L/p, ...], marked as differing per data shard here, once: the
        # transpose of that mark, the data-parallel gradient sum, then also happens once per
        # step, here, and not at every use inside the tick loop.
        params = vary(jax.tree.map(lambda a: a[0], staged))
        s = jax.lax.axis_index("stage")
        on = None if active is None else jnp.asarray(active)[s]
        # Varying over `stage` once, here: the input gradient is then summed over stages once
        # per step, after the loop, instead of once per tick inside it (in float32: `widen`).
        dtype, xs = xs.dtype, vary(widen(xs))

        def tick(carry, t):
            received, outputs = carry
            mb = t - s  # the micro-batch this stage works on at tick t
            x = jnp.where(s == 0, xs[jnp.clip(t, 0, m - 1)].astype(dtype), received)
            # Bubble ticks skip the compute: nothing they would produce is ever used.
            y = jax.lax.cond((mb >= 0) & (mb < m), lambda w, x: run_stage(w, x, on),
                             lambda _, x: x, params, x)
            done = jnp.clip(mb, 0, m - 1)
            keep = (s == p - 1) & (mb >= 0)
            outputs = outputs.at[done].set(jnp.where(keep, y, outputs[done]))
            sent = jax.lax.ppermute(y, "stage", [(i, i + 1) for i in range(p - 1)])
            return (sent, outputs), None

        init = vary((jnp.zeros(xs.shape[1:], dtype), jnp.zeros(xs.shape, dtype)))
        (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(m + p - 1))
        # Only the last stage holds results; the others hold zeros.
        if scatter:
            return jax.lax.psum_scatter(widen(outputs), "stage", scatter_dimension=0, tiled=True)
        return jax.lax.psum(widen(outputs), "stage")

    return loop(staged, xs).astype(xs.dtype)
