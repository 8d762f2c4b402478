"""One executor for any schedule table (gpipe, 1f1b, interleaved, zb-h1), backward by hand.

`pipelined_loss` runs the whole schedule, forward AND backward actions, inside one
`jax.shard_map` that is manual over `stage` and the data axes (as `pipeline.gpipe`; `tensor`
stays automatic, so TP works inside each action): a `lax.scan` over the ticks of
`simulate(schedule, F=B=W=1)`. Each tick every stage reads its row of a small int32 table
(built here in numpy), runs idle / F / B / W with `lax.switch`, then sends one activation
forward and one gradient backward (`ppermute`). A received tensor is written straight into a
ring-buffer slot that `plan` assigned by interval colouring (arrival → last read), so the
buffers hold only what is alive at once: for 1F1B at most p stage inputs, whatever m is.

B recomputes its chunk's forward from the stashed stage input under `jax.vjp` (one
micro-batch's intermediates alive at a time). The last virtual stage also runs the head and
the loss inside its B, seeded with 1/m, so the loss is the mean over micro-batches. zb-h1:
B produces only the input gradient and W recomputes for the weight gradient.

`pipelined_loss` is a `jax.custom_vjp`: its forward does all of the above and keeps the
gradients (blocks, head, inputs) as residuals; its backward scales them by the incoming
cotangent. So `jax.value_and_grad` of embed → pipelined_loss works unchanged.

Each data shard accumulates the gradients of its own mean loss through the loop; they are
averaged over the data axes once, after it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pipeline.gpipe import DP, stage_function, vary, widen
from pipeline.schedules import Action as Act, make_schedule
from pipeline.simulate import simulate

IDLE, FWD, BWD_DX, BWD_DW, BWD = 0, 1, 2, 3, 4  # action codes; BWD: both input and weights
# Table columns per (tick, stage).
CODE, MB, CHUNK, XSLOT, GSLOT, FIRST, LAST, RECV_X, RECV_G, DXROW = range(10)


@dataclasses.dataclass(frozen=True)
class Plan:
    table: np.ndarray  # [ticks, p, 10] int32
    x_slots: int  # stash slots per stage (excluding the dummy slot)
    g_slots: int  # received-gradient slots per stage (excluding the dummy slot)
    ring: bool  # interleaved: the last stage's F output goes to stage 0


def _colour(intervals):
    """intervals: list of (write_tick, last_read_tick, key). A slot written at the end of tick
    w may reuse one whose last read happened at a tick <= w (reads precede writes in a tick)."""
    free_at, out = [], {}
    for w, r, key in sorted(intervals):
        slot = next((i for i, f in enumerate(free_at) if f <= w), None)
        if slot is None:
            slot = len(free_at)
            free_at.append(r)
        free_at[slot] = r
        out[key] = slot
    return out, len(free_at)


def plan(name: str, p: int, m: int, v: int = 1) -> Plan:
    """The per-tick table and buffer sizes for schedule `name` on p stages, m micro-batches."""
    sched = make_schedule(name, p, m, v)
    sim = simulate(sched, {"F": 1, "B": 1, "W": 1})
    st, split, n_virtual = sim.starts, sched.split_backward, p * v
    xs_iv, gs_iv = {s: [] for s in range(p)}, {s: [] for s in range(p)}
    for (s, a), t in st.items():
        if a.kind != "F":
            continue
        k = sched.virtual_stage(s, a.chunk)
        reads = [st[(s, Act("B", a.microbatch, a.chunk))]]
        if split:
            reads.append(st[(s, Act("W", a.microbatch, a.chunk))])
        if k > 0:  # the input arrives from virtual stage k-1 (stage 0 reads xs directly)
            ps, pc = sched.place(k - 1)
            xs_iv[s].append((st[(ps, Act("F", a.microbatch, pc))], max(reads + [t]),
                             (ps, a.microbatch, a.chunk)))
        if k < n_virtual - 1:  # the output gradient arrives from virtual stage k+1
            ns, nc = sched.place(k + 1)
            gs_iv[s].append((st[(ns, Act("B", a.microbatch, nc))], max(reads),
                             (ns, a.microbatch, a.chunk)))
    x_slot, g_slot, nx, ng = {}, {}, 1, 1
    for s in range(p):
        got, n = _colour(xs_iv[s])
        x_slot.update({(s, mb, c): sl for (_, mb, c), sl in got.items()})
        nx = max(nx, n)
        got, n = _colour(gs_iv[s])
        g_slot.update({(s, mb, c): sl for (_, mb, c), sl in got.items()})
        ng = max(ng, n)
    tab = np.zeros((sim.ticks, p, 10), np.int32)
    tab[:, :, XSLOT], tab[:, :, GSLOT] = nx, ng  # dummy slots
    tab[:, :, RECV_X], tab[:, :, RECV_G], tab[:, :, DXROW] = nx, ng, m
    for (s, a), t in st.items():
        mb, c = a.microbatch, a.chunk
        k = sched.virtual_stage(s, c)
        first, last = k == 0, k == n_virtual - 1
        row = tab[t, s]
        row[MB], row[CHUNK], row[FIRST], row[LAST] = mb, c, first, last
        row[XSLOT] = nx if first else x_slot[(s, mb, c)]
        if a.kind == "F":
            row[CODE] = IDLE if last else FWD  # the last chunk's forward is redone in its B
            if not last:  # the next virtual stage receives the output at the end of tick t
                ns, nc = sched.place(k + 1)
                tab[t, ns, RECV_X] = x_slot[(ns, mb, nc)]
            continue
        row[GSLOT] = ng if last else g_slot[(s, mb, c)]
        if a.kind == "W":
            row[CODE] = BWD_DW
            continue
        row[CODE] = BWD_DX if split else BWD
        if first:
            row[DXROW] = mb
        else:
            ps, pc = sched.place(k - 1)
            tab[t, ps, RECV_G] = g_slot[(ps, mb, pc)]
    return Plan(tab, nx, ng, ring=v > 1)


def to_virtual_stages(stacked, p: int, v: int):
    """[L, ...] → [p, v, L/(v·p), ...]: chunk c of stage s holds virtual stage c·p + s."""
    def one(a):
        a = a.reshape(v, p, a.shape[0] // (v * p), *a.shape[1:])
        return jnp.swapaxes(a, 0, 1)
    return jax.tree.map(one, stacked)


def from_virtual_stages(staged):
    """Inverse of `to_virtual_stages`."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[3:]), staged)


def _run(block_def, staged, head_fn, head_params, xs, targets, name, remat, v):
    """Loss and gradients (blocks, head, inputs) of the whole pipelined step."""
    p = jax.tree.leaves(staged)[0].shape[0]
    m = xs.shape[0]
    pl = plan(name, p, m, v)
    run_stage = stage_function(block_def, remat)
    perm_f = [(i, (i + 1) % p) for i in range(p if pl.ring else p - 1)]
    perm_b = [((i + 1) % p, i) for i in range(p if pl.ring else p - 1)]

    def zeros_out(w, hp, x):
        return (jnp.zeros_like(x), jnp.zeros_like(x), jax.tree.map(jnp.zeros_like, w),
                jax.tree.map(jnp.zeros_like, hp), jnp.zeros((), jnp.float32))

    def branch(kind, last):
        def run(w, hp, x, g, tgt):
            y0, dx0, dw0, dh0, l0 = zeros_out(w, hp, x)
            if kind == "idle":
                return vary((y0, dx0, dw0, dh0, l0))
            if kind == "F":
                return vary((run_stage(w, x), dx0, dw0, dh0, l0))
            want_dx, want_dw = kind in ("B", "BX"), kind in ("B", "BW")
            y, pull = jax.vjp(run_stage, w, x)
            dh, loss = dh0, l0
            if last:
                loss, hpull = jax.vjp(lambda hp, y: head_fn(hp, y, tgt), hp, y)
                dh, g = hpull(vary(jnp.asarray(1.0 / m, loss.dtype)))
                loss = loss.astype(jnp.float32) / m
            dw, dx = pull(g.astype(y.dtype))
            return vary((y0, dx if want_dx else dx0, dw if want_dw else dw0,
                          dh if (want_dw and last) else dh0,
                          loss if want_dx else l0))
        return run

    kinds = {IDLE: "idle", FWD: "F", BWD_DX: "BX", BWD_DW: "BW", BWD: "B"}
    # Compile only the (action, last) pairs this table uses; CODE becomes a branch index.
    keys = pl.table[:, :, CODE] + 5 * pl.table[:, :, LAST]
    used = sorted({0, *np.unique(keys).tolist()})
    branches = [branch(kinds[k % 5], k >= 5) for k in used]
    table = pl.table.copy()
    table[:, :, CODE] = np.searchsorted(used, keys)
    tab = jnp.asarray(table)

    @functools.partial(
        jax.shard_map, in_specs=(P("stage"), P(), P(None, DP), P(None, DP)),
        out_specs=(P("stage"), P(), P(None, DP), P()), axis_names={"stage", *DP},
    )
    def loop(staged, head_params, xs, targets):
        # This stage's [v, L/(vp), ...] and the head, marked as differing per stage and per data
        # shard: each shard accumulates its own gradients (of its own mean loss) through the
        # loop, and they are averaged over the data axes once, after it, not once per tick.
        params = vary(jax.tree.map(lambda a: a[0], staged))
        hp = vary(head_params)
        s = jax.lax.axis_index("stage")
        x0 = xs[0]
        # Receive buffers start as NaN: a slot read before the planner's write (a bubble
        # leaking into real work) would turn the loss and every gradient into NaN.
        init = vary((
            jnp.full((pl.x_slots + 1, *x0.shape), jnp.nan, x0.dtype),
            jnp.full((pl.g_slots + 1, *x0.shape), jnp.nan, x0.dtype),
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(jnp.zeros_like, hp),
            jnp.zeros((m + 1, *x0.shape), x0.dtype),
            jnp.zeros((), jnp.float32),
        ))

        def tick(carry, rows):
            stash, gbuf, acc_w, acc_h, dxs, loss = carry
            r = rows[s]
            mb, c = r[MB], r[CHUNK]
            x = jnp.where(r[FIRST] == 1, xs[mb], stash[r[XSLOT]])
            w = jax.tree.map(lambda a: a[c], params)
            y, dx, dw, dh, l = jax.lax.switch(r[CODE], branches, w, hp, x, gbuf[r[GSLOT]],
                                              targets[mb])
            acc_w = jax.tree.map(lambda A, d: A.at[c].add(d), acc_w, dw)
            acc_h = jax.tree.map(jnp.add, acc_h, dh)
            dxs = dxs.at[r[DXROW]].set(dx)
            stash = stash.at[r[RECV_X]].set(jax.lax.ppermute(y, "stage", perm_f))
            gbuf = gbuf.at[r[RECV_G]].set(jax.lax.ppermute(dx, "stage", perm_b))
            return (stash, gbuf, acc_w, acc_h, dxs, loss + l), None

        (_, _, acc_w, acc_h, dxs, loss), _ = jax.lax.scan(tick, init, tab)
        # Loss and gradients of the mean over data shards of each shard's mean loss.
        n_dp = jax.lax.axis_size(DP)
        mean_dp = functools.partial(jax.lax.pmean, axis_name=DP)
        return (jax.tree.map(lambda a: mean_dp(a)[None], acc_w),
                mean_dp(jax.lax.psum(acc_h, "stage")),
                jax.lax.psum(widen(dxs[:m]), "stage") / n_dp, mean_dp(jax.lax.psum(loss, "stage")))

    return loop(staged, head_params, xs, targets)


def pipelined_loss(block_def, staged, head_fn, head_params, xs, targets_mb,
                   schedule_name: str = "1f1b", remat: str = "none", virtual_stages: int = 1):
    """Mean over micro-batches of head_fn(head_params, blocks(xs[i]), targets_mb[i]).

    staged: block params [p, L/p, ...] (`gpipe.to_stages`), or [p, v, L/(v·p), ...]
    (`to_virtual_stages`) when virtual_stages > 1. xs: (m, b_mb, T, D); targets_mb: (m, b_mb, T).
    head_fn(head_params, y, targets) → that micro-batch's mean loss (a scalar).
    Differentiable in staged, head_params and xs (custom_vjp; the schedule runs in the forward).
    """
    v = virtual_stages
    if v == 1:
        staged_v = jax.tree.map(lambda a: a[:, None], staged)
    else:
        staged_v = staged

    @jax.custom_vjp
    def f(staged_v, head_params, xs, targets):
        return _run(block_def, staged_v, head_fn, head_params, xs, targets,
                    schedule_name, remat, v)[3]

    def fwd(staged_v, head_params, xs, targets):
        gw, gh, gx, loss = _run(block_def, staged_v, head_fn, head_params, xs, targets,
                                schedule_name, remat, v)
        return loss, (gw, gh, gx)

    def bwd(res, ct):
        gw, gh, gx = res
        scale = lambda a: (a * ct).astype(a.dtype)  # noqa: E731
        return (jax.tree.map(scale, gw), jax.tree.map(scale, gh), scale(gx), None)

    f.defvjp(fwd, bwd)
    return f(staged_v, head_params, xs, targets_mb)
