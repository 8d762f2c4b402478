"""Buffer slots: where each value that waits between two actions of one stage lives.

Four buffers per stage, each a scan-carried ring of slots (`pipeline.table`):
- x: stage inputs, from their arrival (end of the sender's F tick) to the F that reads them;
- g: output gradients, from their arrival (or, on the last virtual stage, the head that makes
  them) to the B that reads them;
- stash: F's residuals, from F to B;
- kept: split backward only, what B keeps for W (each weight product's input and output
  gradient), from B to W.
A slot lives from its write to its last read; slots are reused by interval colouring, so a
buffer holds only what is alive at once: for 1F1B at most p micro-batches, whatever m.

Within a tick the executor runs F (and the head), then B, then W, and the sends come last.
So where a tick holds several actions (DualPipeV's F beside a full backward), what an action
writes must not land in a slot that a later action of the same tick still reads: an action's
writes take their slot half a tick early (a W still reads the slot its own tick's B has just
written). With one action per tick this changes no slot. Arrivals come at the end of the tick,
after every read. Why not B first: a `lax.cond` that reads a carried buffer followed by one
that writes it makes XLA copy the buffer every tick (measured, XLA CPU: BENCHMARKS.md).
"""

from tppjax.pipeline.schedules import Action, ActionKind, Schedule

BUFFERS = ("x", "g", "stash", "kept")
F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


def lifetimes(sched: Schedule, starts: dict) -> dict[tuple[str, int], list]:
    """Per (buffer, stage), every value's (write tick, last read tick, (micro-batch, chunk)).
    `starts`: the tick of each (stage, action), `simulate(sched, lockstep=True).starts`."""
    n_virtual = sched.stages * sched.virtual_stages
    spans = {(b, s): [] for b in BUFFERS for s in range(sched.stages)}
    for (s, a), t in starts.items():
        if a.kind != F:
            continue
        key, k = (a.microbatch, a.chunk), sched.virtual_stage(s, a.chunk)
        b = starts[(s, Action(B, *key))]
        spans["stash", s].append((t - 0.5, b, key))
        if sched.split_backward:
            spans["kept", s].append((b - 0.5, starts[(s, Action(W, *key))], key))
        if k > 0:  # the input arrives from virtual stage k-1 (virtual stage 0 reads xs)
            ps, pc = sched.place(k - 1)
            spans["x", s].append((starts[(ps, Action(F, a.microbatch, pc))], t, key))
        if k < n_virtual - 1:  # the output gradient arrives from virtual stage k+1
            ns, nc = sched.place(k + 1)
            spans["g", s].append((starts[(ns, Action(B, a.microbatch, nc))], b, key))
        else:  # the head, in F's tick, writes dLoss/dy
            spans["g", s].append((t - 0.5, b, key))
    return spans


def colour(intervals: list) -> tuple[dict, int]:
    """(slot of each key, slots used) for intervals (write tick, last read tick, key): a slot
    written at tick w may reuse one whose last read came at a tick <= w (reads precede the
    arrivals of their tick; writes before a read of their own tick come half a tick early)."""
    free_at, out = [], {}
    for w, r, key in sorted(intervals):
        slot = next((i for i, f in enumerate(free_at) if f <= w), None)
        if slot is None:
            slot = len(free_at)
            free_at.append(r)
        free_at[slot] = r
        out[key] = slot
    return out, len(free_at)


def assign_slots(sched: Schedule, starts: dict) -> tuple[dict, dict[str, int]]:
    """({(buffer, stage, micro-batch, chunk): slot}, {buffer: slots per stage}): the most any
    stage needs, so that every stage's buffer has one shape."""
    slot, size = {}, dict.fromkeys(BUFFERS, 0)
    for (buf, s), spans in lifetimes(sched, starts).items():
        got, n = colour(spans)
        slot.update({(buf, s, *key): i for key, i in got.items()})
        size[buf] = max(size[buf], n)
    return slot, size
