"""One executor for any schedule table (gpipe, 1f1b, interleaved, zb-h1, ...), backward by hand.

`pipelined_loss` runs the whole schedule, forward AND backward actions, inside one
`jax.shard_map` that is manual over `stage` and the data axes (as `pipeline.gpipe`; `tensor`
stays automatic, so TP works inside each action): a `lax.scan` over the ticks of
`simulate(schedule, lockstep=True)` (one tick per slot). Each tick every stage reads its row
of a small int32 table (built here in numpy), runs its F, B and W (each a `lax.cond`; a slot
may hold several, as DualPipeV's F beside a full backward; idle runs none), then hands
on what it made: activations to the stage that holds the next virtual stage, gradients to the
one that holds the previous, by `ppermute` to the next or the previous stage (looped
placement: activations down and around the ring, gradients up; V placement's second chunk:
the other way round) or, where both virtual stages are on one stage, by a write into its own
buffer. Each `ppermute` runs only on ticks where some stage receives one (GPipe sends no
gradient while it runs forwards, nor activations while it runs backwards).

Each action does only its own work (`pipeline.actions`): F runs the stage forward once under
`jax.vjp` and keeps the pullback's residuals (less the weights); B rebuilds the pullback from
them and runs no forward; `remat` picks what the residuals are (none: all intermediates,
layer: each layer's input, stage: the stage input, so B recomputes the forward). The last
virtual stage's F also runs the head and the loss (seeded with 1/m, so the loss is the mean
over micro-batches) and its backward, and keeps dLoss/dy for its own B. zb-h1 splits the
backward: B computes the input gradient and each weight product's output gradient, W only
the weight-gradient matmuls.

Everything that waits between actions sits in a scan-carried ring buffer, in the slot `plan`
assigned by interval colouring (write → last read), so the buffers hold only what is alive at
once: stage inputs (arrival → F), output gradients (arrival → B), F's residuals (F → B) and,
split, each weight product's input (F → W) and output gradient (B → W). For 1F1B that is at
most p micro-batches each, whatever m.

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

from tppjax.errors import ConfigError
from tppjax.pipeline.actions import StageActions
from tppjax.pipeline.gpipe import DP, to_stages, vary, widen
from tppjax.pipeline.layout import ACTIVE_SCOPE, StageLayout
from tppjax.pipeline.schedules import Action as Act
from tppjax.pipeline.schedules import Schedule, ScheduleError, make_schedule
from tppjax.pipeline.simulate import simulate

# Table columns per (tick, stage). A tick runs at most one F, one B and one W (together where the
# schedule shares a slot: DualPipeV's F beside another micro-batch's full backward), each with
# its own columns, then the ring-buffer slot of each read and write. An arrival comes from the
# next stage, the previous one, or the stage itself (V placement's turn, where virtual stages
# p-1 and p share a stage; the last virtual stage's own dLoss/dy).
(F_ON, F_MB, F_CHUNK, FIRST, LAST, B_ON, B_CHUNK, DXROW, W_ON, W_CHUNK,
 X_GET, X_NEXT, X_PREV, X_SELF, G_GET, G_NEXT, G_PREV, G_SELF, R_GET, R_PUT, I_GET, I_PUT,
 W_GET, W_PUT) = range(24)
ON = {"F": F_ON, "B": B_ON, "W": W_ON}  # kind → its column: 1 on the ticks that run one
BUFFERS = {  # buffer → its (read, write...) columns; a slot lives from its write to its read
    "x": (X_GET, X_NEXT, X_PREV, X_SELF),  # stage inputs: arrival → F
    "g": (G_GET, G_NEXT, G_PREV, G_SELF),  # output gradients: arrival → B
    "r": (R_GET, R_PUT),  # F's residuals: F → B
    "i": (I_GET, I_PUT),  # split backward: each weight product's input, F → W
    "w": (W_GET, W_PUT),  # split backward: each weight product's output gradient, B → W
}


@dataclasses.dataclass(frozen=True)
class Plan:
    table: np.ndarray  # [ticks, p, 24] int32
    slots: dict[str, int]  # per buffer in BUFFERS: slots per stage (excluding the dummy slot)
    chunks: int  # v: chunks per stage
    ring: bool  # looped placement with v > 1: stage p-1 sends to stage 0 and back
    split: bool  # B is the input gradient only, W the weight gradient
    virtual: np.ndarray  # [p, v]: the virtual stage of each stage's chunk


def _colour(intervals):
    """intervals: list of (write_tick, last_read_tick, key). A slot written at tick w may reuse
    one whose last read happened at a tick <= w (reads precede writes in a tick; a write that
    comes before a read of the same tick says so with w half a tick early: `plan_of`)."""
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
    return plan_of(make_schedule(name, p, m, v))


def plan_of(sched: Schedule) -> Plan:
    """The per-tick table and buffer sizes of a schedule: one tick per slot (`simulate`'s
    lockstep), each action's ring-buffer slots by interval colouring.

    Within a tick the executor runs F (and the head), then B, then W, and the sends come last.
    So where a slot holds several actions, what an action writes must not land in a buffer
    slot that a later action of the same tick still reads: F's residuals and inputs, and B's
    output gradients, take their slot half a tick early (a W still reads the one its own
    slot's B has just written). With one action per tick this changes no slot. Why not B
    first: measured (XLA CPU, jax 0.10.2), a `lax.cond` that reads a carried buffer followed
    by one that writes it makes XLA copy the buffer every tick: 1F1B's step went from 1.19x
    to 2.55x one device's, GPipe's from 1.27x to 4.50x (stage=4,tensor=2, m=8, `small`)."""
    p, m, v = sched.stages, sched.microbatches, sched.virtual_stages
    st = simulate(sched, lockstep=True).starts
    ticks, split, n_virtual = max(st.values()) + 1, sched.split_backward, p * v
    spans = {(b, s): [] for b in BUFFERS for s in range(p)}  # (write tick, read tick, key)
    for (s, a), t in st.items():
        if a.kind != "F":
            continue
        key, k = (a.microbatch, a.chunk), sched.virtual_stage(s, a.chunk)
        b = st[(s, Act("B", *key))]
        spans["r", s].append((t - 0.5, b, key))
        if split:
            w = st[(s, Act("W", *key))]
            spans["i", s].append((t - 0.5, w, key))
            spans["w", s].append((b - 0.5, w, key))
        if k > 0:  # the input arrives from virtual stage k-1 (stage 0 reads xs directly)
            ps, pc = sched.place(k - 1)
            spans["x", s].append((st[(ps, Act("F", a.microbatch, pc))], t, key))
        if k < n_virtual - 1:  # the output gradient arrives from virtual stage k+1
            ns, nc = sched.place(k + 1)
            spans["g", s].append((st[(ns, Act("B", a.microbatch, nc))], b, key))
        else:  # the last virtual stage's F computes the loss and its gradient
            spans["g", s].append((t, b, key))
    slot, size = {}, dict.fromkeys(BUFFERS, 0)
    for (buf, s), iv in spans.items():
        got, n = _colour(iv)
        slot.update({(buf, s, *key): sl for key, sl in got.items()})
        size[buf] = max(size[buf], n)
    ring = sched.placement == "looped" and v > 1

    tab = np.zeros((ticks, p, 24), np.int32)
    dummy = np.zeros(24, np.int32)
    for buf, cols in BUFFERS.items():
        dummy[list(cols)] = size[buf]  # the dummy slot: reads and writes nobody needs
    dummy[DXROW] = m
    tab[:] = dummy

    def arrive(t: int, sender: int, receiver: int, columns: tuple[int, int, int], value: int):
        """`receiver` records what `sender` hands it at the end of tick t, in the column among
        (sent to the next stage, sent to the previous, handed to itself) that says how."""
        down = receiver == sender + 1 or ring and (sender, receiver) == (p - 1, 0)
        col = columns[2] if receiver == sender else columns[0] if down else columns[1]
        if tab[t, receiver, col] != dummy[col]:
            raise ScheduleError(f"stage {receiver} would receive two hand-offs of one kind at "
                                f"tick {t}; put the actions of stage {sender} that make them "
                                "in different slots")
        tab[t, receiver, col] = value

    for (s, a), t in st.items():
        mb, c = a.microbatch, a.chunk
        k = sched.virtual_stage(s, c)
        row = tab[t, s]
        if a.kind == "F":
            row[F_ON], row[F_MB], row[F_CHUNK] = 1, mb, c
            row[FIRST], row[LAST], row[R_PUT] = k == 0, k == n_virtual - 1, slot["r", s, mb, c]
            if split:
                row[I_PUT] = slot["i", s, mb, c]
            if k > 0:
                row[X_GET] = slot["x", s, mb, c]
            if k == n_virtual - 1:  # the head's dLoss/dy, for its own B
                arrive(t, s, s, (G_NEXT, G_PREV, G_SELF), slot["g", s, mb, c])
            else:  # the next virtual stage receives the output at the end of tick t
                ns, nc = sched.place(k + 1)
                arrive(t, s, ns, (X_NEXT, X_PREV, X_SELF), slot["x", ns, mb, nc])
        elif a.kind == "B":
            row[B_ON], row[B_CHUNK] = 1, c
            row[R_GET], row[G_GET] = slot["r", s, mb, c], slot["g", s, mb, c]
            if split:
                row[W_PUT] = slot["w", s, mb, c]
            if k == 0:
                row[DXROW] = mb
            else:
                ps, pc = sched.place(k - 1)
                arrive(t, s, ps, (G_NEXT, G_PREV, G_SELF), slot["g", ps, mb, pc])
        else:
            row[W_ON], row[W_CHUNK] = 1, c
            row[I_GET], row[W_GET] = slot["i", s, mb, c], slot["w", s, mb, c]
    virtual = np.array([[sched.virtual_stage(s, c) for c in range(v)] for s in range(p)])
    return Plan(tab, size, chunks=v, ring=ring, split=split, virtual=virtual)


def action_scope(kind: str) -> str:
    """The named scope of one action's ops in the compiled program: F, B (unsplit), BX (the
    input gradient) and BW (the weight gradient) of a split backward, "head" for the head and
    loss that the last virtual stage runs after its F, and "idle"."""
    return f"action_{kind}"


def scope_kind(kind: str, split: bool) -> str:
    """The scope name (`action_scope`) of a schedule's action kind F, B or W."""
    return {"F": "F", "B": "BX" if split else "B", "W": "BW"}[kind]


SENDS = {  # scope → (column of the receiving stage, buffer, to the next stage?)
    "send_activation": (X_NEXT, "x", True),  # down the stages (looped: around the ring)
    "send_activation_back": (X_PREV, "x", False),  # up the stages: V placement's second chunk
    "send_gradient": (G_PREV, "g", False),  # up the stages
    "send_gradient_back": (G_NEXT, "g", True),  # down: V placement's second chunk
}


def sends(pl: Plan) -> dict[str, np.ndarray]:
    """Per send scope (`SENDS`) that the schedule uses, [ticks] bools: does any stage receive
    one at this tick? All stages take part in a `ppermute`, so on the other ticks it is
    skipped."""
    out = {name: (pl.table[:, :, col] != pl.slots[buf]).any(1)
           for name, (col, buf, _) in SENDS.items()}
    return {name: ticks for name, ticks in out.items() if ticks.any()}


CHUNK = {"F": F_CHUNK, "B": B_CHUNK, "W": W_CHUNK}  # kind → the column of its chunk


def layers_run(pl: Plan, stage_layers, kind: str) -> np.ndarray:
    """[ticks, p]: the real layers of the virtual stage whose `kind` action each stage's tick
    runs (uneven stages: `stage_layers` per virtual stage; read where `ON[kind]` is 1)."""
    chunk = pl.table[:, :, CHUNK[kind]]
    return np.asarray(stage_layers)[pl.virtual[np.arange(chunk.shape[1]), chunk]]


def action_counts(pl: Plan, stage_layers=None) -> dict[str, np.ndarray]:
    """Per action scope, the ticks each stage runs it: [p] counts (a tick that runs nothing is
    "idle"; one that shares a slot counts for each of its actions; "head" runs on the F ticks
    of the last virtual stage); per send scope, the ticks it runs (the same on every stage).
    With uneven stages (`stage_layers`: real layers per virtual stage), per action scope also
    "<scope>/<ACTIVE_SCOPE>": [p] ticks x the fraction of the padded slots that hold a real
    layer, summed over the ticks (which chunk each runs decides)."""
    on = {kind: pl.table[:, :, col] == 1 for kind, col in ON.items()}
    counts = {action_scope("idle"): (~(on["F"] | on["B"] | on["W"])).sum(0)}
    counts |= {action_scope(scope_kind(kind, pl.split)): ticks.sum(0)
               for kind, ticks in on.items() if ticks.any()}
    counts[action_scope("head")] = (on["F"] & (pl.table[:, :, LAST] == 1)).sum(0)
    if stage_layers is not None:
        for kind, ticks in on.items():
            real = layers_run(pl, stage_layers, kind) / max(stage_layers)
            counts[f"{action_scope(scope_kind(kind, pl.split))}/{ACTIVE_SCOPE}"] = (
                ticks * real).sum(0)
    return counts | {name: np.full(pl.table.shape[1], ticks.sum())
                     for name, ticks in sends(pl).items()}


def chunk_moves(schedule: Schedule) -> list[list[tuple[int, int, int, int]]]:
    """How `to_virtual_stages` fills the chunks that live on another stage in the canonical
    layout (layers split contiguously over `stage`: stage s holds virtual stages s·v ..
    s·v + v − 1 as its local chunks 0 .. v − 1). Rounds of moves (source stage, its local
    chunk, stage, chunk), each stage sending and receiving at most one chunk per round: one
    `ppermute` each. Rounds are filled greedily, so there are at most 2Δ − 1 of them for Δ the
    most chunks one stage sends or receives (Δ for the placements here: one for V at p = 2,
    two for looped p = 4, v = 2)."""
    p, v = schedule.stages, schedule.virtual_stages
    rounds: list[list[tuple[int, int, int, int]]] = []
    for s in range(p):
        for c in range(v):
            k = schedule.virtual_stage(s, c)
            if k // v == s:
                continue
            move = (k // v, k % v, s, c)
            free = (r for r in rounds if all(move[0] != o[0] and s != o[2] for o in r))
            round_ = next(free, None)
            if round_ is None:
                rounds.append([move])
            else:
                round_.append(move)
    return rounds


def to_virtual_stages(stacked, schedule: Schedule, stage_axis: str = "stage"):
    """[L, ...] → [p, v, L/(v·p), ...]: chunk c of stage s holds the layers of virtual stage
    `schedule.virtual_stage(s, c)` (looped: c·p + s; V: s, then 2p − 1 − s).

    The chunks that live on other stages arrive in the rounds of `chunk_moves`, one `ppermute`
    each; their gradients go back by its transpose. Measured: letting XLA reshard a reordered
    [v, p, ...] instead moved 2x the stage's weights each way at p = 4, v = 2 (looped; this:
    1x) and 3.5x the looped amount for V at p = 2 (this: the same as looped)."""
    p, v = schedule.stages, schedule.virtual_stages
    here = np.array([[schedule.virtual_stage(s, c) for c in range(v)] for s in range(p)])
    own = np.where(here // v == np.arange(p)[:, None], here % v, v)  # v: arrives from elsewhere
    rounds = []
    for moves in chunk_moves(schedule):
        send, land = np.zeros(p, np.int32), np.full(p, v, np.int32)
        for src, j, dst, c in moves:
            send[src], land[dst] = j, c
        rounds.append(([(src, dst) for src, _, dst, _ in moves], send, land))

    @functools.partial(jax.shard_map, in_specs=P(stage_axis), out_specs=P(stage_axis),
                       axis_names={stage_axis})
    def place(local):
        s = jax.lax.axis_index(stage_axis)

        def one(a):
            a = a.reshape(v, a.shape[0] // v, *a.shape[1:])
            padded = jnp.concatenate([a, jnp.zeros_like(a[:1])])
            out = [padded[jnp.asarray(own)[s, c]] for c in range(v)]
            for pairs, send, land in rounds:
                got = jax.lax.ppermute(a[jnp.asarray(send)[s]], stage_axis, pairs)
                out = [o + jnp.where(jnp.asarray(land)[s] == c, got, 0) for c, o in enumerate(out)]
            return jnp.stack(out)[None]

        return jax.tree.map(one, local)

    return place(stacked)


def _buffer(n: int, like) -> jax.Array:
    """n slots. NaN at first: a slot read before the planner's write (a bubble leaking into real
    work) would turn the loss and every gradient into NaN."""
    fill = jnp.nan if jnp.issubdtype(like.dtype, jnp.floating) else 0
    return jnp.full((n, *like.shape), fill, like.dtype)


def _run(block_def, staged, head_fn, head_params, xs, targets, schedule, remat, active,
         stage_axis, dp):
    """Loss and gradients (blocks, head, inputs) of the whole pipelined step. `active`: None,
    or [virtual stage, slot] bools, False for the padding slots that every action skips.
    `stage_axis`, `dp`: the mesh axes that split the stages and the micro-batch rows."""
    p, m = schedule.stages, schedule.microbatches
    pl = plan_of(schedule)
    act = StageActions(block_def, remat, pl.split)
    to_next = [(i, (i + 1) % p) for i in range(p if pl.ring else p - 1)]
    perms = {True: to_next, False: [(j, i) for i, j in to_next]}  # to the next stage?
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)

    def chunk_of(tree, c):
        # One chunk (v = 1): a static index, so no copy of the stage's weights per tick.
        return jax.tree.map(lambda a: a[c] if pl.chunks > 1 else a[0], tree)

    def put(bufs, i, values):
        return tuple(b.at[i].set(a) for b, a in zip(bufs, values, strict=True))

    def when(flag, kind, action, unchanged, *args):
        """`action(*args)` on the ticks where this stage runs `kind`, else `unchanged(*args)`.
        Each action updates the buffers and sums it touches in place and returns only what is
        sent. Measured (XLA CPU, jax 0.10.2): a `lax.cond` whose one branch writes into carried
        buffers and whose other passes them through updates them in place; a `lax.switch` over
        three or more branches, or two branches writing different buffers, copies every buffer
        it passes on every tick, and one switch over all actions returning everything any of
        them makes (F's stash, W's inputs, dw) zero-fills and copies those too: ~10 MB per
        device per tick on `small`, more time than the actions themselves. Ops are named by
        `action_scope`: the census weights them by the ticks that run the action."""
        return jax.lax.cond(flag, jax.named_scope(action_scope(kind))(action), unchanged, *args)

    def layers_on(c):
        """This stage's chunk c's real layers (None: no padding)."""
        if active is None:
            return None
        return jnp.asarray(active)[jnp.asarray(pl.virtual)[jax.lax.axis_index(stage_axis), c]]

    def forward(params, xs, xbuf, rbuf, ibuf, r):
        x = jnp.where(r[FIRST] == 1, xs[r[F_MB]], xbuf[r[X_GET]])
        y, stash = act.forward(chunk_of(params, r[F_CHUNK]), x, layers_on(r[F_CHUNK]))
        return vary((y, put(rbuf, r[R_PUT], stash), ibuf))

    def head(hp, y, tgt, acc_h):
        """The loss of this micro-batch, and its gradient for this stage's B."""
        loss, hpull = jax.vjp(lambda hp, y: head_fn(hp, y, tgt), hp, y)
        dh, g_own = hpull(vary(jnp.asarray(1.0 / m, loss.dtype)))
        return vary((loss.astype(jnp.float32) / m, g_own, jax.tree.map(jnp.add, acc_h, dh)))

    def backward(params, gbuf, rbuf, wbuf, acc_w, dxs, r):
        c = r[B_CHUNK]
        dw, dx, deltas = act.backward(chunk_of(params, c), tuple(b[r[R_GET]] for b in rbuf),
                                      gbuf[r[G_GET]], layers_on(c))
        acc_w = jax.tree.map(lambda A, d: A.at[c].add(d), acc_w, dw)
        if pl.split:
            wbuf = put(wbuf, r[W_PUT], deltas)
        return vary((dx, acc_w, wbuf, dxs.at[r[DXROW]].set(dx)))

    def weights(params, ibuf, wbuf, acc_w, r):
        c = r[W_CHUNK]
        dw = act.weight_grads(chunk_of(params, c), tuple(b[r[W_GET]] for b in wbuf),
                              layers_on(c))
        return vary(jax.tree.map(lambda A, d: A.at[c].add(d), acc_w, dw))

    def no_forward(params, xs, xbuf, rbuf, ibuf, r):
        return vary((jnp.zeros_like(xbuf[0]), rbuf, ibuf))

    def no_head(hp, y, tgt, acc_h):
        return vary((jnp.zeros((), jnp.float32), jnp.zeros_like(y), acc_h))

    def no_backward(params, gbuf, rbuf, wbuf, acc_w, dxs, r):
        return vary((jnp.zeros_like(gbuf[0]), acc_w, wbuf, dxs))

    tab = jnp.asarray(pl.table)
    sending = sends(pl)  # the send scopes this schedule uses, and their ticks
    turn = (pl.table[:, :, X_SELF] != pl.slots["x"]).any()

    def send(flag, value, perm):
        """`ppermute`, or zeros where no stage receives (the same on every stage: a tick
        without a send skips the collective everywhere)."""
        return jax.lax.cond(flag, lambda v: jax.lax.ppermute(v, stage_axis, perm),
                            jnp.zeros_like, value)

    @functools.partial(
        jax.shard_map, in_specs=(P(stage_axis), P(), P(None, dp), P(None, dp)),
        out_specs=(P(stage_axis), P(), P(None, dp), P()), axis_names={stage_axis, *dp},
    )
    def loop(staged, head_params, xs, targets):
        # This stage's [v, L/(vp), ...] and the head, marked as differing per stage and per data
        # shard: each shard accumulates its own gradients (of its own mean loss) through the
        # loop, and they are averaged over the data axes once, after it, not once per tick.
        params = vary(jax.tree.map(lambda a: a[0], staged))
        hp = vary(head_params)
        s = jax.lax.axis_index(stage_axis)
        x0 = vary(xs[0])
        # Trace F and B once to learn what F and B keep for later actions (and to fix the
        # layout of the pullback that B rebuilds): the buffers are sized from these shapes.
        def probe(w, x):
            on = None if active is None else layers_on(0)
            _, stash = act.forward(w, x, on)
            return stash, (), act.backward(w, stash, x, on)[2]

        stash, inputs, deltas = jax.eval_shape(probe, jax.tree.map(lambda a: a[0], params), x0)
        # Sends write every tick, into the extra dummy slot when nothing arrives; the actions
        # write only real slots.
        init = vary((
            _buffer(pl.slots["x"] + 1, x0), _buffer(pl.slots["g"] + 1, x0),
            tuple(_buffer(pl.slots["r"], a) for a in stash),
            tuple(_buffer(pl.slots["i"], a) for a in inputs),
            tuple(_buffer(pl.slots["w"], a) for a in deltas),
            zeros(params), zeros(hp), jnp.zeros((m + 1, *x0.shape), x0.dtype),
            jnp.zeros((), jnp.float32),
        ))

        def tick(carry, per_tick):
            xbuf, gbuf, rbuf, ibuf, wbuf, acc_w, acc_h, dxs, loss = carry
            rows, *send_now = per_tick
            r = rows[s]
            # F, then B, then W: see `plan_of` for the buffer slots this order allows.
            y, rbuf, ibuf = when(r[F_ON] == 1, "F", forward, no_forward, params, xs, xbuf, rbuf,
                                 ibuf, r)
            loss_mb, g_own, acc_h = when(r[LAST] == 1, "head", head, no_head, hp, y,
                                         targets[r[F_MB]], acc_h)
            dx, acc_w, wbuf, dxs = when(r[B_ON] == 1, scope_kind("B", pl.split), backward,
                                        no_backward, params, gbuf, rbuf, wbuf, acc_w, dxs, r)
            if pl.split:
                acc_w = when(r[W_ON] == 1, "BW", weights, lambda *args: args[-2],
                             params, ibuf, wbuf, acc_w, r)
            # What this stage hands itself: dLoss/dy of its head, or on V placement's turn
            # (virtual stages p-1 and p on one stage) the output, and later dx, in between.
            gbuf = gbuf.at[r[G_SELF]].set(jnp.where(r[LAST] == 1, g_own, dx))
            if turn:
                xbuf = xbuf.at[r[X_SELF]].set(y)
            for name, flag in zip(sending, send_now, strict=True):
                col, buf, down = SENDS[name]
                with jax.named_scope(name):
                    got = send(flag, y if buf == "x" else dx, perms[down])
                    if buf == "x":
                        xbuf = xbuf.at[r[col]].set(got)
                    else:
                        gbuf = gbuf.at[r[col]].set(got)
            return (xbuf, gbuf, rbuf, ibuf, wbuf, acc_w, acc_h, dxs, loss + loss_mb), None

        (*_, acc_w, acc_h, dxs, loss), _ = jax.lax.scan(
            tick, init, (tab, *(jnp.asarray(t) for t in sending.values())))
        # Loss and gradients of the mean over data shards of each shard's mean loss.
        n_dp = jax.lax.axis_size(dp)
        mean_dp = functools.partial(jax.lax.pmean, axis_name=dp)
        return (jax.tree.map(lambda a: mean_dp(a)[None], acc_w),
                mean_dp(jax.lax.psum(acc_h, stage_axis)),
                jax.lax.psum(widen(dxs[:m]), stage_axis) / n_dp,
                mean_dp(jax.lax.psum(loss, stage_axis)))

    return loop(staged, head_params, xs, targets)


def pipelined_loss(layer, layers, xs, targets, loss_fn, loss_params, schedule: Schedule,
                   remat: str = "none", stage_layers=None, stage_axis: str = "stage",
                   data_axes: tuple[str, ...] = DP):
    """Pipeline any stack of layers: the mean over micro-batches i of
    loss_fn(loss_params, layers applied in order to xs[i], targets[i]), run by `schedule`.

    layer: the `nnx.GraphDef` of one layer, an NNX module mapping x to a y of x's shape, or a
    plain function (layer params, x) -> y; layers: its state (or params) stacked on a leading
    axis [L, ...] (`nnx.split` of a module built with `nnx.vmap`, or of the Transformer's
    `blocks`; for a function, any pytree of arrays).
    xs: (m, micro-batch rows, ...); targets: (m, ...). loss_fn(loss_params, y, targets[i]) →
    that micro-batch's mean loss, a scalar: the head goes here (`loss_params` may be ()).
    schedule: a value (`make_schedule`, `read_schedule_file`); its stages must be the mesh's
    `stage_axis`. Call it under `jax.set_mesh` of a mesh (`spmd.mesh.make_mesh`, or any mesh
    with those axis names): layers are split over `stage_axis`, micro-batch rows over
    `data_axes` (default this project's `data`, `fsdp`), other axes stay automatic inside a
    layer (this project's `tensor`).
    stage_layers: layers per virtual stage (model order, p·v numbers), for stages of unequal
    size; then `layers` is either the [L] stack or already padded to the slots of
    `pipeline.layout.StageLayout(stage_layers)`. Without it, L must divide by p·v.
    Zero-bubble schedules split each layer's backward exactly where its weight products go
    through `tppjax.models.project` (one product per weight); any other parameter's gradient
    (all of a plain function's) is computed whole in B, which is still correct.
    Differentiable in layers, loss_params and xs (custom_vjp; the schedule runs in the
    forward, and the backward scales the gradients it kept).
    """
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual_stages
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    mesh = dict(jax.sharding.get_abstract_mesh().shape)
    mesh_p = mesh.get(stage_axis)
    missing = [a for a in data_axes if a not in mesh]
    layout = None if stage_layers is None else StageLayout(tuple(stage_layers))
    if layout is not None and min(layout.counts) < 0:
        raise ConfigError(f"stage_layers {list(layout.counts)} has a negative count; give "
                          "layers per virtual stage, 0 or more")
    if layout is None:
        fits = n_layers % (p * v) == 0
        fix = "change the layers or the schedule, or give stage_layers"
    else:
        fits = len(layout.counts) == p * v and n_layers in (layout.n_layers, layout.slots)
        fix = (f"give {p * v} stage_layers (stages x virtual stages) that sum to {n_layers}, or "
               f"a stack padded to {p * v} x their largest")
    for bad, message in (
            (xs.shape[0] != m, f"xs holds {xs.shape[0]} micro-batches but the schedule "
                               f"{schedule.name} runs {m}; micro-batch the inputs into {m}"),
            (mesh_p != p, f"the schedule {schedule.name} has {p} stages but the mesh's "
                          f"{stage_axis!r} axis is {mesh_p}; make them equal, or name the "
                          "stage axis with stage_axis="),
            (bool(missing), f"the mesh has no axis {missing[0] if missing else ''!r}; name "
                            f"the mesh axes that split the batch with data_axes= (mesh axes: "
                            f"{', '.join(mesh)})"),
            (not fits, f"{n_layers} layers do not split into {p} stages x {v} virtual stages"
                       f"{'' if layout is None else ' as ' + str(list(layout.counts))}; {fix}")):
        if bad:
            raise ConfigError(message)
    active = None
    if layout is not None and layout.padded:
        active = layout.active()
        if n_layers == layout.n_layers:
            layers = layout.pad(layers)
    if v == 1:
        staged = jax.tree.map(lambda a: a[:, None], to_stages(layers, p))
    else:
        staged = to_virtual_stages(layers, schedule, stage_axis)

    @jax.custom_vjp
    def f(staged, loss_params, xs, targets):
        return _run(layer, staged, loss_fn, loss_params, xs, targets, schedule, remat, active,
                    stage_axis, data_axes)[3]

    def fwd(staged, loss_params, xs, targets):
        gw, gh, gx, loss = _run(layer, staged, loss_fn, loss_params, xs, targets, schedule,
                                remat, active, stage_axis, data_axes)
        return loss, (gw, gh, gx)

    def bwd(res, ct):
        gw, gh, gx = res
        scale = lambda a: (a * ct).astype(a.dtype)  # noqa: E731
        return (jax.tree.map(scale, gw), jax.tree.map(scale, gh), scale(gx), None)

    f.defvjp(fwd, bwd)
    return f(staged, loss_params, xs, targets)
