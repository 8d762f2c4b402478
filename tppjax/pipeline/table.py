"""What stage s runs at tick t, and where its output goes: the executor's table.

`plan_of(schedule)` lowers a schedule (per-stage action lists, `pipeline.schedules`) to
`Table`: for every tick t and stage s, what runs and which buffer slots it reads and writes.
It is the executor's only input from the schedule (`pipeline.executor` runs any table and has
no schedule-specific branch), so this file answers the question for any schedule:

1. Ticks. `simulate(schedule, lockstep=True)` lays each stage's slots on ticks, one slot per
   tick (a slot is one action; DualPipeV also joins an F with another micro-batch's B and W).
   An action starts once what it needs has arrived: F(mb, k) the output of F(mb, k-1), B(mb, k)
   its own F and the gradient of B(mb, k+1), W its own B (k: the virtual stage, chunk c of
   stage s; looped placement k = c·p + s, V placement k = s then 2p-1-s).
2. What runs. `runs[kind][t, s]` for F, HEAD, B, W; `chunk[kind][t, s]` which chunk;
   `microbatch[t, s]` F's micro-batch. Within a tick: F (whose input is `xs[microbatch]` on
   virtual stage 0, `first`, else slot `x_read` of the x buffer; it stashes its residuals
   in slot `stash_write`), then on the last virtual stage HEAD (loss and dLoss/dy, into slot
   `g_write`), then B (reads `g_read`, `stash_read`; split: keeps what W needs in
   `kept_write`; virtual stage 0: its input gradient is row `dx_row` of the result), then W
   (reads `kept_read`).
3. Where the output goes, at the end of the tick. F's output y goes to the stage holding
   virtual stage k+1, B's input gradient dx to the one holding k-1. `SENDS` names the four
   ways, each one `ppermute` over all stages: activations to the next stage (`SEND_F`;
   looped with v > 1: stage p-1 to 0 around the ring) or, on V's chunk 1, to the previous
   (`SEND_F_BACK`); gradients to the previous stage (`SEND_B`) or, on V's chunk 1, the next
   (`SEND_B_BACK`). The receiving stage's row says where it lands: `arrive[kind][t, s]` is
   the slot of stage s's x (activations) or g (gradients) buffer, NO_SLOT when nothing comes
   that way. Where k and k+1 are on one stage (V's turn, virtual stages p-1 and p) nothing
   is sent: y goes into its own slot `x_turn`, dx into `g_turn`.
A send runs on the ticks where some stage receives by it (`sends`), and is skipped on the
others (GPipe sends no gradient while it runs forwards).

Slots (`pipeline.slots`) are reused as soon as their value is read, so 1F1B's buffers hold at
most p micro-batches whatever m. Example, 1F1B on p = 2, m = 2 (`scripts/schedule.py
--lockstep` draws it): tick 0, stage 0 runs F0 on xs[0]; its y arrives in stage 1's x slot 0
(`arrive[SEND_F][0, 1]` = 0). Tick 1, stage 1 runs F0 on x slot 0 (`x_read[1, 1]`) and its
HEAD, while stage 0's F1 output arrives in the same slot, free again. Tick 2, stage 1 runs
B0, whose dx arrives in stage 0's g slot 0 (`arrive[SEND_B][2, 0]`), read by B0 at tick 3.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from tppjax.pipeline.layout import ACTIVE_SCOPE
from tppjax.pipeline.schedules import Action, ActionKind, Schedule, ScheduleError, make_schedule
from tppjax.pipeline.simulate import simulate
from tppjax.pipeline.slots import assign_slots

F, B, W, HEAD = ActionKind.F, ActionKind.B, ActionKind.W, ActionKind.HEAD
NO_SLOT = -1  # nothing read or written: x and g have one slot more, the last, for these


class Send(NamedTuple):
    buffer: str  # what it carries lands in: "x" (F's output) or "g" (B's input gradient)
    down: bool  # to the next stage (s to s+1; ring: p-1 to 0), else to the previous one


SENDS = {ActionKind.SEND_F: Send("x", True), ActionKind.SEND_F_BACK: Send("x", False),
         ActionKind.SEND_B: Send("g", False), ActionKind.SEND_B_BACK: Send("g", True)}


class Table(NamedTuple):
    """Per tick and stage, [ticks, p] int32 each (flags 0/1; a slot: NO_SLOT when unused)."""

    runs: dict  # {F, HEAD, B, W: does the stage run it}
    chunk: dict  # {F, B, W: which chunk}
    microbatch: np.ndarray  # F's micro-batch: its input xs[microbatch], its target
    first: np.ndarray  # F is virtual stage 0's: its input is xs[microbatch]
    x_read: np.ndarray  # F's input slot
    stash_write: np.ndarray  # F's residuals
    g_write: np.ndarray  # HEAD's dLoss/dy
    g_read: np.ndarray  # B's output gradient
    stash_read: np.ndarray  # B's residuals
    kept_write: np.ndarray  # split: what B keeps for W
    dx_row: np.ndarray  # virtual stage 0's B: the micro-batch of its input gradient
    kept_read: np.ndarray  # W's
    arrive: dict  # {send kind in SENDS: the slot that receives by it}
    x_turn: np.ndarray  # V's turn: this stage's own y
    g_turn: np.ndarray  # V's turn: this stage's own dx


@dataclasses.dataclass(frozen=True)
class Plan:
    table: Table
    slots: dict[str, int]  # per buffer (`slots.BUFFERS`): slots per stage, NO_SLOT's not counted
    chunks: int  # v: chunks per stage
    ring: bool  # looped placement with v > 1: stage p-1 sends to stage 0 and back
    split: bool  # B is the input gradient only, W the weight gradient
    virtual: np.ndarray  # [p, v]: the virtual stage of each stage's chunk

    @property
    def ticks(self) -> int:
        return len(self.table.first)

    @property
    def turn(self) -> bool:
        """V placement: virtual stages p-1 and p on one stage, which hands itself y and dx."""
        return bool((self.table.x_turn != NO_SLOT).any())


def plan(name: str, p: int, m: int, v: int = 1) -> Plan:
    """The table and buffer sizes for schedule `name` on p stages, m micro-batches."""
    return plan_of(make_schedule(name, p, m, v))


def plan_of(sched: Schedule) -> Plan:
    """The table and buffer sizes of a schedule: one tick per slot, each action's buffer slots
    by interval colouring (`pipeline.slots`)."""
    starts = simulate(sched, lockstep=True).starts
    slot, size = assign_slots(sched, starts)
    table = _empty(max(starts.values()) + 1, sched.stages)
    for (s, a), t in starts.items():
        _record(table, sched, s, a, t, slot)
    p, v = sched.stages, sched.virtual_stages
    virtual = np.array([[sched.virtual_stage(s, c) for c in range(v)] for s in range(p)])
    return Plan(table, size, chunks=v, ring=sched.placement == "looped" and v > 1,
                split=sched.split_backward, virtual=virtual)


def _empty(ticks: int, p: int) -> Table:
    """A table in which nothing runs and every slot is NO_SLOT."""
    def full(value=NO_SLOT):
        return np.full((ticks, p), value, np.int32)

    return Table(runs={k: full(0) for k in (F, HEAD, B, W)}, chunk={k: full(0) for k in (F, B, W)},
                 microbatch=full(0), first=full(0),
                 **{f: full() for f in Table._fields if f.endswith(("_read", "_write", "_turn"))},
                 dx_row=full(), arrive={k: full() for k in SENDS})


def _record(table: Table, sched: Schedule, s: int, a: Action, t: int, slot: dict) -> None:
    """Write action `a` of stage s at tick t into the table, and where its output arrives."""
    mb, c = a.microbatch, a.chunk
    k, last = sched.virtual_stage(s, c), sched.stages * sched.virtual_stages - 1
    table.runs[a.kind][t, s], table.chunk[a.kind][t, s] = 1, c
    if a.kind == F:
        table.microbatch[t, s], table.first[t, s] = mb, k == 0
        table.stash_write[t, s] = slot["stash", s, mb, c]
        if k > 0:
            table.x_read[t, s] = slot["x", s, mb, c]
        if k == last:
            table.runs[HEAD][t, s], table.g_write[t, s] = 1, slot["g", s, mb, c]
        else:
            ns, nc = sched.place(k + 1)
            _arrive(table, sched, t, s, ns, "x", slot["x", ns, mb, nc])
    elif a.kind == B:
        table.g_read[t, s], table.stash_read[t, s] = slot["g", s, mb, c], slot["stash", s, mb, c]
        if sched.split_backward:
            table.kept_write[t, s] = slot["kept", s, mb, c]
        if k == 0:
            table.dx_row[t, s] = mb
        else:
            ps, pc = sched.place(k - 1)
            _arrive(table, sched, t, s, ps, "g", slot["g", ps, mb, pc])
    else:
        table.kept_read[t, s] = slot["kept", s, mb, c]


def _arrive(table: Table, sched: Schedule, t: int, sender: int, receiver: int, buffer: str,
            value: int) -> None:
    """`receiver` records, in slot `value` of its `buffer`, what `sender` hands it at the end
    of tick t: by the send kind that goes that way, or by a write of its own (V's turn)."""
    p = sched.stages
    if receiver == sender:
        (table.x_turn if buffer == "x" else table.g_turn)[t, receiver] = value
        return
    ring = sched.placement == "looped" and sched.virtual_stages > 1
    down = receiver == sender + 1 or ring and (sender, receiver) == (p - 1, 0)
    kind = next(k for k, send in SENDS.items() if send == (buffer, down))
    if table.arrive[kind][t, receiver] != NO_SLOT:
        raise ScheduleError(f"stage {receiver} would receive two hand-offs of one kind at "
                            f"tick {t}; put the actions of stage {sender} that make them "
                            "in different slots")
    table.arrive[kind][t, receiver] = value


def sends(pl: Plan) -> dict[ActionKind, np.ndarray]:
    """Per send kind that the schedule uses, [ticks] bools: does any stage receive by it at
    this tick? Every stage takes part in a `ppermute`, so on the other ticks it is skipped."""
    out = {kind: (slots != NO_SLOT).any(1) for kind, slots in pl.table.arrive.items()}
    return {kind: ticks for kind, ticks in out.items() if ticks.any()}


def layers_run(pl: Plan, stage_layers, kind: ActionKind) -> np.ndarray:
    """[ticks, p]: the real layers of the virtual stage whose `kind` action each stage's tick
    runs (uneven stages: `stage_layers` per virtual stage; read where `runs[kind]` is 1)."""
    chunk = pl.table.chunk[kind]
    return np.asarray(stage_layers)[pl.virtual[np.arange(chunk.shape[1]), chunk]]


def action_counts(pl: Plan, stage_layers=None) -> dict[str, np.ndarray]:
    """Per action scope (`ActionKind.scope`), the ticks each stage runs it: [p] counts (IDLE:
    a tick that runs nothing; a tick that holds several actions counts for each); per send
    scope, the ticks it runs (the same on every stage). With uneven stages (`stage_layers`:
    real layers per virtual stage), per action also "<scope>/<ACTIVE_SCOPE>": [p] ticks x the
    fraction of the padded slots that hold a real layer, summed over the ticks."""
    runs = {k: pl.table.runs[k] == 1 for k in (F, B, W)}
    counts = {ActionKind.IDLE.scope: (~(runs[F] | runs[B] | runs[W])).sum(0),
              HEAD.scope: pl.table.runs[HEAD].sum(0)}
    counts |= {k.scope: ticks.sum(0) for k, ticks in runs.items() if ticks.any()}
    if stage_layers is not None:
        for k, ticks in runs.items():
            real = layers_run(pl, stage_layers, k) / max(stage_layers)
            counts[f"{k.scope}/{ACTIVE_SCOPE}"] = (ticks * real).sum(0)
    p = len(pl.virtual)
    return counts | {k.scope: np.full(p, ticks.sum()) for k, ticks in sends(pl).items()}
