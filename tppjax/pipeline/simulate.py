"""Lay a schedule's per-stage action lists on integer ticks and measure it.

Timing model: each stage runs its slots (`Schedule.slots`; one action each but in
dualpipe-v) in the given order, one at a time; a slot starts at the first tick where the
stage is free and every dependency (see `schedules.dependencies`) of its members from
outside the slot has ended. Its members then run one after another, each for its own cost
(the default), or, with `lockstep=True`, all together in one tick whatever the slot holds:
the SPMD executor's tick, which runs a whole slot. A result that ends at tick e on one stage
can be used from tick e on any stage: the ppermute happens at the tick boundary.

Memory model (why `peak_inflight` counts what it counts): a micro-batch's activations for
chunk c are *in flight* on a stage from the start of its F until the end of its last
backward pass there: B, or W when the backward is split. W needs the same stashed inputs
(or `jax.linearize` residuals) as B, so an executor must keep the buffer slot until W ends;
`slots` is sized by that rule. Under it ZB-H1 matches 1F1B's peak memory as the paper
states it (Qi et al. 2024: the maximum over stages, p micro-batches, reached by 1F1B on
stage 0), while its later stages hold more than their 1F1B counterparts (p-s).
Activations are counted per (micro-batch, chunk); with v chunks each is 1/v of a stage.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tppjax.pipeline.schedules import (
    SCHEDULED,
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    dependencies,
    make_schedule,
    validate,
)


def default_costs(schedule: Schedule) -> dict[str, int]:
    """F=1, B=2 (a backward does about twice a forward's matmuls); split: F=B=W=1."""
    return {"F": 1, "B": 1, "W": 1} if schedule.split_backward else {"F": 1, "B": 2}


@dataclass(frozen=True)
class Simulation:
    """The timed schedule. `table[t][s]` is the action occupying stage s at tick t (an
    action of cost c fills c consecutive ticks; lockstep: the first action of the slot that
    fills tick t); `starts[(s, action)]` is its first tick (lockstep: its slot's tick)."""

    schedule: Schedule
    costs: Mapping[str, int]
    ticks: int  # makespan
    starts: dict[tuple[int, Action], int]
    table: list[list[Action | None]]
    bubble_fraction: float  # idle stage-ticks / (p * ticks)
    stage_bubble: tuple[float, ...]  # idle ticks of stage s / ticks
    peak_inflight: tuple[int, ...]  # max (micro-batch, chunk) activations held per stage
    slots: dict[tuple[int, int, int], int]  # (stage, microbatch, chunk) -> buffer slot
    ideal_ticks: int  # the busiest stage's work: the makespan with no bubble
    lockstep: bool = False  # one tick per slot (`costs` are then 1 for every kind)

    @property
    def bubble_ratio(self) -> float:
        """(ticks - ideal) / ideal: the bubble relative to useful time, as Megatron states it."""
        return (self.ticks - self.ideal_ticks) / self.ideal_ticks

    @property
    def period(self) -> int:
        """Ticks per step if steps ran back to back with no barrier between them, each stage
        starting the next step once done with this one (Qi et al. 2024 replace the optimizer's
        cross-stage sync by a check afterwards for this): the longest span from a stage's
        first action to the end of its last. `ticks` where stage 0 starts first and ends last
        (all but ZB-H2 and ZB-V, whose stage s starts s ticks after stage 0 and ends s ticks
        after it: a parallelogram). The executor here runs one step per jitted call: its step
        is `ticks`."""
        spans = []
        for s in range(self.schedule.stages):
            busy = [t for t, row in enumerate(self.table) if row[s] is not None]
            spans.append(busy[-1] + 1 - busy[0])
        return max(spans)

    def end(self, stage: int, action: Action) -> int:
        return self.starts[(stage, action)] + self.costs[action.kind]


def simulate(schedule: Schedule, costs: Mapping[str, int] | None = None,
             lockstep: bool = False) -> Simulation:
    """Time `schedule`; raise ScheduleError if its cross-stage order deadlocks.

    lockstep=True: every slot takes one tick, all its members start (and end) together, and
    `costs` are only checked; the result's `costs` are 1 for every kind, so `end`, the
    memory figures and `ideal_ticks` (slots on the busiest stage) count slot ticks. For a
    schedule without shared slots this is the simulation at F=B=W=1."""
    validate(schedule)
    costs = dict(costs) if costs is not None else default_costs(schedule)
    kinds = SCHEDULED if schedule.split_backward else SCHEDULED[:2]
    for kind in kinds:
        if not isinstance(costs.get(kind), int) or costs[kind] < 1:
            raise ScheduleError(f"cost of {kind} must be a positive integer (got "
                                f"{costs.get(kind)!r}); give costs like {default_costs(schedule)}")
    if lockstep:
        costs = dict.fromkeys(kinds, 1)
    p = schedule.stages
    starts = _place(schedule, costs, lockstep)
    ticks = max(starts[(s, a)] + costs[a.kind] for s, a in starts)

    table: list[list[Action | None]] = [[None] * p for _ in range(ticks)]
    for s in range(p):
        for slot in schedule.slots(s):
            for a in (slot[:1] if lockstep else slot):
                t0 = starts[(s, a)]
                for t in range(t0, t0 + costs[a.kind]):
                    table[t][s] = a
    idle = [sum(row[s] is None for row in table) for s in range(p)]
    peak, slots = _assign_slots(schedule, costs, starts)
    return Simulation(
        schedule=schedule, costs=costs, ticks=ticks, starts=starts, table=table,
        bubble_fraction=sum(idle) / (p * ticks),
        stage_bubble=tuple(i / ticks for i in idle),
        peak_inflight=peak, slots=slots,
        ideal_ticks=ticks - min(idle),  # without shared slots the same on every stage
        lockstep=lockstep,
    )


def _place(schedule: Schedule, costs: Mapping[str, int], lockstep: bool = False
           ) -> dict[tuple[int, Action], int]:
    """Start tick of every action: sweep the stages, placing each one's next slot as soon
    as all its members' dependencies from outside it are placed, until done or no stage can
    move (deadlock). Members run one after another (lockstep: all in one tick)."""
    p = schedule.stages
    all_slots = [schedule.slots(s) for s in range(p)]
    end: dict[tuple[int, Action], int] = {}
    starts: dict[tuple[int, Action], int] = {}
    nxt = [0] * p  # index of each stage's next unplaced slot
    free = [0] * p  # tick at which each stage is free

    def outside(s: int, slot: tuple[Action, ...]) -> list[tuple[int, Action]]:
        return [d for a in slot for d in dependencies(schedule, a, s)
                if not (d[0] == s and d[1] in slot)]

    while True:
        moved = False
        for s in range(p):
            while nxt[s] < len(all_slots[s]):
                slot = all_slots[s][nxt[s]]
                deps = outside(s, slot)
                if any(d not in end for d in deps):
                    break
                t = max([free[s]] + [end[d] for d in deps])
                for a in slot:
                    starts[(s, a)] = t
                    end[(s, a)] = t + 1 if lockstep else t + costs[a.kind]
                    t = t if lockstep else end[(s, a)]
                free[s] = max(end[(s, a)] for a in slot)
                nxt[s] += 1
                moved = True
        if all(nxt[s] == len(all_slots[s]) for s in range(p)):
            return starts
        if not moved:
            s = next(s for s in range(p) if nxt[s] < len(all_slots[s]))
            slot = all_slots[s][nxt[s]]
            waits = [f"{d} on stage {ds}" for ds, d in outside(s, slot) if (ds, d) not in end]
            what = " + ".join(map(str, slot)) if len(slot) > 1 else str(slot[0])
            raise ScheduleError(f"deadlock: stage {s} is stuck at {what} waiting for "
                                f"{', '.join(waits)}; reorder so it runs earlier")


def _assign_slots(schedule: Schedule, costs: Mapping[str, int],
                  starts: dict[tuple[int, Action], int]
                  ) -> tuple[tuple[int, ...], dict[tuple[int, int, int], int]]:
    """Peak in-flight activations per stage and a buffer slot for each (stage, mb, chunk).

    Lifetime: [start of F, end of the last backward action) (see module docstring); a slot
    freed at tick e can be reused by an F starting at e. Smallest free slot first, in order
    of start tick: greedy colouring of intervals, so slots used == peak overlap.
    """
    last = "W" if schedule.split_backward else "B"
    peaks, slots = [], {}
    for s in range(schedule.stages):
        spans = []
        for mb in range(schedule.microbatches):
            for c in range(schedule.virtual_stages):
                born = starts[(s, Action("F", mb, c))]
                dies = starts[(s, Action(last, mb, c))] + costs[last]
                spans.append((born, dies, mb, c))
        spans.sort()
        live: list[tuple[int, int]] = []  # (dies, slot)
        free_slots: list[int] = []
        used = 0
        for born, dies, mb, c in spans:
            for d, slot in [x for x in live if x[0] <= born]:
                live.remove((d, slot))
                free_slots.append(slot)
            if free_slots:
                slot = min(free_slots)
                free_slots.remove(slot)
            else:
                slot, used = used, used + 1
            live.append((dies, slot))
            slots[(s, mb, c)] = slot
        peaks.append(used)
    return tuple(peaks), slots


def closed_form(schedule: Schedule) -> dict[str, object] | None:
    """Ticks, period, bubble fraction and peak in-flight per stage predicted by formula, for
    the named generators at default costs (F=1, B=2; split: F=B=W=1, per chunk), lockstep
    off. The simulator must agree. None for any other schedule (one from a file that is not a
    generator's own output and placement). Each family's derivation is in its function below;
    period: ticks, except for zb-h2 and zb-v (see `Simulation.period`)."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual_stages
    name = schedule.name
    try:
        own = make_schedule(name, p, m, v) if name in SCHEDULES else None
    except ScheduleError:  # a file named after a generator, with sizes it refuses
        own = None
    if own is None or ((own.actions, own.placement, own.joined)
                       != (schedule.actions, schedule.placement, schedule.joined)):
        return None
    family = {"gpipe": _closed_one_f_one_b, "1f1b": _closed_one_f_one_b,
              "interleaved": _closed_one_f_one_b, "zb-h1": _closed_zb_h, "zb-h2": _closed_zb_h,
              "zb-v": _closed_zb_v, "dualpipe-v": _closed_dualpipe_v}[name]
    ticks, period, peak = family(name, p, m, v)
    ideal = 3 * v * m
    return {
        "ticks": ticks,
        "period": period,
        "bubble_fraction": (ticks - ideal) / ticks,
        "bubble_ratio": (ticks - ideal) / ideal,
        "peak_inflight": tuple(peak),
    }


def _closed_one_f_one_b(name: str, p: int, m: int, v: int) -> tuple[int, int, list[int]]:
    """(ticks, period, peak per stage):
    gpipe, 1f1b: ticks 3(m+p-1), idle fraction (p-1)/(m+p-1); peak m (gpipe), min(p-s, m).
    interleaved: ticks 3(v·m+p-1) in chunk ticks: bubble ratio (p-1)/(v·m) (Narayanan et al.
      2021, §2.2.2); peak v·p-s chunk activations (warm-up + 1)."""
    if name == "interleaved":
        ticks = 3 * (v * m + p - 1)
        return ticks, ticks, [min(v * p - s, v * m) for s in range(p)]
    ticks = 3 * (m + p - 1)
    return ticks, ticks, [m] * p if name == "gpipe" else [min(p - s, m) for s in range(p)]


def _closed_zb_h(name: str, p: int, m: int, v: int) -> tuple[int, int, list[int]]:
    """(ticks, period, peak per stage):
    zb-h1: ticks 3m+p-1 for m >= p (bubble p-1 ticks, 1F1B's is 3(p-1); Qi et al. 2024);
      for m < p stage 0 waits 2p-1 ticks for the first gradient, then has 2m work: 2m+2p-1.
      Peak min(p, m) on every stage (held from F to W).
    zb-h2: ticks 2m+p-1+max(m, p) as zb-h1: no schedule does better at F=B=W=1 (the last
      stage starts at tick p-1 with 3m of work; stage 0 gets its first gradient at 2p-1, then
      has 2m of B and W). ZB-H2 moves the idle ticks to before a stage's first action and
      after its last: period 3m (zero bubble) for m >= 2p-1; below that stage 0 waits from
      its m-th F to tick 2p-1: 2m+2p-1. Peak min(2p-1, m) on every stage."""
    ticks = 2 * m + p - 1 + max(m, p)
    period = max(3 * m, 2 * m + 2 * p - 1) if name == "zb-h2" else ticks
    return ticks, period, [min(p, m) if name == "zb-h1" else min(2 * p - 1, m)] * p


def _closed_zb_v(name: str, p: int, m: int, v: int) -> tuple[int, int, list[int]]:
    """(ticks, period, peak per stage):
    zb-v (v = 2, m >= p; ticks of one chunk action, a stage's work is 6m): no step can take
      fewer than 6m+p-1 ticks (stage p-1 gets its first input at tick p-1), and no stage's
      span can be shorter than 6m, nor than 5m+2p-1 (stage 0's first chunk-1 input comes 2p-1
      ticks after its first F; 5m ticks of work are left then). ZB-V's stage 0 spans the
      larger, and stage s spans as long, s ticks later (a parallelogram): period
      max(6m, 5m+2p-1), ticks period+p-1, so 6m+p-1 for m >= 2p-1 (bubble p-1 chunk ticks,
      (p-1)/2 of a whole stage: half of ZB-H1's) and 5m+3p-2 below. Peak min(2p, m+s+1)
      chunk activations (`schedules._zb_v`): 2p for m >= 2p-1, i.e. p micro-batches of a
      whole stage, 1F1B's peak."""
    period = max(6 * m, 5 * m + 2 * p - 1)
    return period + p - 1, period, [min(2 * p, m + s + 1) for s in range(p)]


def _closed_dualpipe_v(name: str, p: int, m: int, v: int) -> tuple[int, int, list[int]]:
    """(ticks, period, peak per stage):
    dualpipe-v (v = 2, m >= 2p, p >= 2; chunk ticks, a slot's members one after another, so
      F+B+W takes 3 ticks): ticks 6m+p-1, ZB-V's and the least possible (stage p-1 starts at
      p-1 with 6m of work). Stage s's first F runs at s, and for j <= s micro-batch j's
      chunk-1 input reaches it at 2p-1-s+2j, just as the 2(p-s-1)+2j+1 forwards before it
      (steps 1, 2 of `schedules._dualpipe_v`) are done; the loss is on stage 0 (first B at
      2p), and the gradient goes back along chunk 1 one stage a tick, reaching stage s at
      2p+s, as step 2 ends; from there stage p-1 never waits and every stage ends at tick 6m+p-1:
      stage s idles s ticks before its first action and p-1-s inside its span, so the
      period is 6m+p-1 too (ZB-V's: 6m, a parallelogram), bubble fraction (p-1)/(6m+p-1).
      Peak 2p+1 chunk activations on every stage: steps 1-2 run 2p F's before any W; step 3
      frees one (W) before each F; in step 4 (m-2p+s+1 >= 1 rounds) a slot's F starts
      before its W frees another: 2p+1 (ZB-V: 2p); later steps only free. DeepSeek state
      DualPipeV's bubble as (PP/2-1)(F&B+B-3W) at activation PP+1 (deepseek-ai/DualPipe
      README; PP = 2p virtual stages, F&B an overlapped forward + full backward, B a full
      backward): the activation matches (2p+1); at these costs (F&B = 3, B = 2, W = 1) the
      bubble would be 2(p-1) ticks, twice this p-1. The difference is the slot model: here
      a slot's F is done, and sent, after its own tick, before the slot's B and W run;
      with F and B overlapped all of a slot's results come at its end, and the same order
      then takes 6m+2p-2 ticks, DeepSeek's figure. What the overlap buys (communication
      hidden behind compute) this tick model does not credit.
      With lockstep=True (one tick a slot, the SPMD executor's) it takes 2m+5p-2 ticks:
      stage 0 runs 2m+5p-2 slots (stage s: 2m+5p-2s-2, one more on stage p-1, whose first
      forward and backward in step 4 are not joined) and never waits; ZB-V has no shared
      slot, so its lockstep ticks are its 6m+p-1."""
    return 6 * m + p - 1, 6 * m + p - 1, [2 * p + 1] * p
