"""Pipeline schedules as data: per-stage ordered action lists, no JAX.

Symbols: p stages, m micro-batches, v virtual chunks per stage. Where the chunks sit
(`Schedule.placement`, one of PLACEMENTS):
- looped (default): chunk c of stage s holds the layers of virtual stage k = c·p + s (the
  interleaved layer map of docs/design.md §3), so a micro-batch visits stages 0..p-1 with chunk 0,
  then again with chunk 1, and so on.
- v (v = 2 only): chunk 0 of stage s is virtual stage s, chunk 1 is 2p-1-s, so a micro-batch
  goes down the stages with chunk 0 and back up with chunk 1: virtual stages p-1 and p are
  both on stage p-1, and the loss (virtual stage 2p-1) is on stage 0.

An action is F (forward), B (backward) or, for zero-bubble schedules only, W: there B is
the input gradient (sent upstream at once) and W the weight gradient (can wait).
A schedule only fixes the *order* of actions on each stage; `pipeline.simulate` lays them
on ticks, checks cross-stage dependencies and measures bubble and memory.
Slots (`Schedule.joined`, `Schedule.slots`): consecutive actions of a stage may share one
slot, which starts once all its members' inputs from outside the slot are there (DualPipe's
overlapped forward and backward: the forward of one micro-batch with the backward of
another). A slot holds at most one F, one B and one W; a W shares a slot only with its own
B (B then W: a *full backward*), and no member needs another, but for that W. Every
schedule but dualpipe-v has no shared slot (`joined` = ()).

Generators (`make_schedule`):
- gpipe: all forwards, then all backwards (Huang et al. 2019). Peak memory m micro-batches.
- 1f1b: warm-up of p-s-1 forwards on stage s, steady one-forward-one-backward, cool-down of
  the remaining backwards (PipeDream-flush, Narayanan et al. 2021). Same bubble as GPipe,
  peak memory min(p-s, m).
- interleaved: Megatron's interleaved 1F1B with v chunks per stage (Narayanan et al. 2021,
  "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", §2.2);
  bubble ratio (p-1)/(v·m). Needs m to be a multiple of p.
- zb-h1: 1F1B with the backward split into B and W; W's are deferred to fill the cool-down
  bubble (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ICLR, §3.1 ZB-H1).
  With F=B=W=1 its bubble is p-1 ticks against 1F1B's 3(p-1), at 1F1B's peak memory p.
- zb-h2: ZB-H1 with 2(p-s)-1 warm-up forwards and W's reordered into the tail (Qi et al.
  2024, §3.1 ZB-H2): with F=B=W=1 no stage idles between its first and last action (m >= 2p-1),
  at peak memory 2p-1. One step takes as long as ZB-H1's (both are optimal); steps that
  overlap (`Simulation.period`) lose ZB-H1's p-1 idle ticks.
- zb-v: two chunks per stage in the V placement, split backward (Qi et al. 2024, "Zero
  Bubble Pipeline Parallelism", §6 ZB-V; Qi et al. 2024, "Pipeline Parallelism with
  Controllable Memory", V-ZB). Needs v = 2 and m >= p. With F=B=W=1 per chunk and m >= 2p-1
  no stage idles between its first and last action, at 2p chunk activations per stage (p
  micro-batches of a whole stage: 1F1B's peak); one step takes 6m+p-1 chunk ticks, half of
  ZB-H1's bubble.
- dualpipe-v: DeepSeek's DualPipeV, DualPipe "cut in half" (DeepSeek-AI 2024, "DeepSeek-V3
  Technical Report" §3.2.1 for DualPipe; deepseek-ai/DualPipe `dualpipev.py`, and
  `ScheduleDualPipeV` in torch.distributed.pipelining, give the per-rank order): ZB-V's V
  placement and split backward, but its steady state runs the forward of one micro-batch
  and the full backward (B and W) of another in one slot, so an executor can overlap one's
  communication with the other's compute. Needs v = 2, m >= 2p and p >= 2. With F=B=W=1
  per chunk action and a slot's members run one after another, a step takes 6m+p-1 ticks
  (ZB-V's: the least possible) but no stage starts the next step early (period 6m+p-1,
  ZB-V's 6m) and each holds 2p+1 chunk activations (ZB-V: 2p); see `simulate.closed_form`,
  also for DeepSeek's published bubble. In the executor's lockstep ticks (one slot a tick)
  it takes 2m+5p-2 ticks against ZB-V's 6m+p-1, but a tick may hold F+B+W.

Schedules from a file (`load_schedule`, or a name ending in ".json" anywhere a schedule name
goes): JSON in the format `scripts/schedule.py --json` prints (`schedule_to_data`), so any
built-in schedule saved that way is a valid file and trains identically.
"""
from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tppjax.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")
# looped: chunk c of stage s is virtual stage c·p + s (micro-batches loop through the stages
# v times); v: two chunks, stage s holds virtual stages s and 2p-1-s (down, then back up).
PLACEMENTS = ("looped", "v")



class ActionKind(enum.StrEnum):
    """Every kind of work in a pipelined step, spelt once: the value is what schedule files,
    `Action` and the drawings write (F, B, W), and `scope` names the executor's ops in the
    compiled program, from which `tppjax.measure.census` reads each op's kind back (`in_op`)
    and its phase (`phase`). F, B and W are a schedule's actions; the executor also runs the
    head (after the last virtual stage's F) and its sends, each a `ppermute` that is both the
    send and the receive (torch.distributed.pipelining's SEND_F/RECV_F in one)."""

    F = "F"  # forward of one micro-batch through one chunk
    B = "B"  # its backward: the input gradient (unsplit: and the weight gradient)
    W = "W"  # split backward only: the weight gradient
    HEAD = "head"  # after the last virtual stage's F: head, loss and their gradient
    IDLE = "idle"  # a tick that runs no action
    SEND_F = "send_activation"  # F's output to the next stage (looped, v > 1: p-1 to 0)
    SEND_F_BACK = "send_activation_back"  # to the previous stage: V placement's chunk 1
    SEND_B = "send_gradient"  # B's input gradient to the previous stage
    SEND_B_BACK = "send_gradient_back"  # to the next stage: V placement's chunk 1

    @property
    def scope(self) -> str:
        """The named scope of its ops in the compiled program."""
        return f"action_{self.value}"

    @property
    def phase(self) -> str:
        """The census phase of its ops (`tppjax.measure.census.PHASES`): a send's is the phase
        of what it carries."""
        return {ActionKind.HEAD: "head/loss", ActionKind.SEND_F: "F", ActionKind.SEND_F_BACK: "F",
                ActionKind.SEND_B: "B", ActionKind.SEND_B_BACK: "B"}.get(self, self.value)

    @staticmethod
    def in_op(name: str) -> ActionKind | None:
        """The kind whose scope an op's name holds (the innermost), or None."""
        found = _SCOPE.findall(name)
        return _BY_SCOPE[found[-1]] if found else None


SCHEDULED = (ActionKind.F, ActionKind.B, ActionKind.W)  # what a schedule's actions are
_BY_SCOPE = {k.scope: k for k in ActionKind}
_SCOPE = re.compile(rf"(?:^|/)({'|'.join(sorted(_BY_SCOPE, key=len, reverse=True))})(?=/|$)")


class ScheduleError(ConfigError):
    """A schedule that cannot run, or bad sizes; the message names the value and the fix."""


def chunks_needed(name: str) -> int:
    """The number of chunks per stage (virtual stages) a named schedule runs by default: 2 for
    interleaved (which runs any v) and for the V-placed zb-v and dualpipe-v (exactly 2), 1
    for the rest (and for a schedule file, which says its own)."""
    return 2 if name in ("interleaved", "zb-v", "dualpipe-v") else 1


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work on one stage: `kind` of `microbatch` through virtual chunk `chunk`."""

    kind: ActionKind  # F, B or W; a plain "F" is taken as ActionKind.F
    microbatch: int
    chunk: int = 0

    def __post_init__(self):
        object.__setattr__(self, "kind", ActionKind(self.kind))

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists: `actions[s]` is what stage s runs, in order.

    `joined[s]` holds the positions n such that `actions[s][n]` runs in the same slot as
    `actions[s][n-1]` (DualPipe's overlapped forward and backward); () (the default) or an
    empty set: every action in a slot of its own. See `slots`.
    """

    name: str
    stages: int  # p
    microbatches: int  # m
    virtual_stages: int  # v: chunks per stage
    split_backward: bool  # True: B = input gradient, W = weight gradient (zero bubble)
    actions: tuple[tuple[Action, ...], ...]
    placement: str = "looped"  # which virtual stage each (stage, chunk) holds; PLACEMENTS
    joined: tuple[frozenset[int], ...] = ()  # per stage: positions sharing the previous slot

    def slots(self, stage: int) -> list[tuple[Action, ...]]:
        """Stage `stage`'s actions grouped into slots, in order (each slot's actions in order)."""
        joined = self.joined[stage] if self.joined else frozenset()
        out: list[tuple[Action, ...]] = []
        for n, a in enumerate(self.actions[stage]):
            if n in joined and out:
                out[-1] += (a,)
            else:
                out.append((a,))
        return out

    def virtual_stage(self, stage: int, chunk: int) -> int:
        """Position of (stage, chunk) along the model: chunk·p + stage (looped); stage for
        chunk 0 and 2p-1-stage for chunk 1 (v)."""
        if self.placement == "v" and chunk == 1:
            return 2 * self.stages - 1 - stage
        return chunk * self.stages + stage

    def place(self, virtual_stage: int) -> tuple[int, int]:
        """Inverse of `virtual_stage`: (stage, chunk) that holds a virtual stage."""
        stage, chunk = virtual_stage % self.stages, virtual_stage // self.stages
        if self.placement == "v" and chunk == 1:
            return self.stages - 1 - stage, 1
        return stage, chunk


# ------------------------------------------------------------------ generators


def _gpipe(p: int, m: int) -> list[list[Action]]:
    """All F then all B: every activation is alive when the first B starts (memory m)."""
    return [
        [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]
        for _ in range(p)
    ]


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """Warm-up p-s-1 F's, steady F+B pairs, cool-down B's: stage s holds <= p-s activations."""
    out = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [Action("F", i) for i in range(warm)]
        for i in range(m - warm):  # steady: one forward, then the oldest backward
            acts += [Action("F", warm + i), Action("B", i)]
        acts += [Action("B", i) for i in range(m - warm, m)]  # cool-down
        out.append(acts)
    return out


def _interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021).

    Stage s runs m·v chunk-forwards in groups of p micro-batches: micro-batches g·p..g·p+p-1
    through chunk 0, then the same group through chunk 1, ... (k-th forward: group k // (p·v),
    chunk (k mod p·v) // p). Backwards go through the chunks in reverse order. Warm-up is
    (v-1)·p + (p-s-1) forwards: enough for the first micro-batch to come back through all
    later virtual stages; with v=1 this is exactly 1F1B. Megatron uses 2·(p-s-1) in place
    of p-s-1 to overlap its blocking send/recv; our ticks model communication as free at
    the tick boundary, where the smaller warm-up is already bubble-optimal and uses less
    memory.
    """

    def fwd(k: int) -> Action:
        group, r = divmod(k, p * v)
        return Action("F", group * p + r % p, r // p)

    def bwd(k: int) -> Action:
        group, r = divmod(k, p * v)
        return Action("B", group * p + r % p, v - 1 - r // p)

    total = m * v
    out = []
    for s in range(p):
        warm = min((v - 1) * p + p - s - 1, total)
        acts = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            acts += [fwd(warm + k), bwd(k)]
        acts += [bwd(k) for k in range(total - warm, total)]
        out.append(acts)
    return out


def _zb_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2024, §3.1): 1F1B's F/B order, with W's deferred into the cool-down.

    Stage s runs exactly 1F1B's sequence of F's and B's (B is now only the input gradient,
    so the gradient reaches stage s-1 sooner). After each B it runs the oldest pending W
    only while more than s W's are pending; the rest run at the end. Why s: with F=B=W=1
    the last gradient needs s more ticks to travel from stage s to stage 0, so stage s's
    last B ends s+1 ticks before stage 0 finishes; its s deferred W's and the last one fill
    exactly those ticks, where 1F1B idles in its cool-down. Bubble: p-1 ticks (1F1B: 3(p-1))
    for m >= p.
    Memory: a micro-batch is held from F to W, so stage s holds (p-s) + s = p micro-batches,
    1F1B's peak (its stage 0), which is the paper's "same memory as 1F1B".
    """
    out = []
    for s, fb in enumerate(_one_f_one_b(p, m)):
        acts: list[Action] = []
        n_b = n_w = 0
        for a in fb:
            acts.append(a)
            if a.kind == "B":
                n_b += 1
                while n_b - n_w > s:  # keep at most s W's waiting
                    acts.append(Action("W", n_w))
                    n_w += 1
        acts += [Action("W", i) for i in range(n_w, m)]
        out.append(acts)
    return out


def _zb_h2(p: int, m: int) -> list[list[Action]]:
    """ZB-H2 (Qi et al. 2024, §3.1): more warm-up forwards than ZB-H1, and W's in the tail, so
    that with F=B=W=1 each stage is busy without a gap from its first action to its last.

    Warm-up: 2(p-s)-1 F's on stage s. Stage s starts at tick s and the first input gradient
    reaches it at tick 2p-1-s (the last stage's B0 runs at tick p, then one tick per stage
    back), so these F's fill exactly the gap where ZB-H1 idles. Then each B is followed by
    the next F; a stage that already holds 2p-1 micro-batches (F run, W not) first runs its
    oldest W: stage s defers 2s W's while it climbs from 2(p-s)-1 to 2p-1, then runs B W F,
    one micro-batch per 3 ticks, in step with its neighbours. Once the F's are spent, B W,
    and the 2s W's still pending close the step: 2s+1 W's after the last B mirror the
    2(p-s)-1 F's before the first, so stage s ends at tick 3m+s and the timeline is a
    parallelogram (for m >= 2p-1; with fewer, all m fit in stage 0's warm-up, which then idles
    until the first gradient, as every schedule must).
    Memory: a micro-batch is held from F to W, at most 2p-1 on every stage (the paper's
    (2p-1) M_B), min(m, 2p-1) reached on each.
    """
    out = []
    for s in range(p):
        warm = min(2 * (p - s) - 1, m)
        acts = [Action("F", i) for i in range(warm)]
        n_f, n_w = warm, 0
        for b in range(m):
            acts.append(Action("B", b))
            if n_f == m or n_f - n_w == 2 * p - 1:  # cool-down, or memory full: oldest W
                acts.append(Action("W", n_w))
                n_w += 1
            if n_f < m:
                acts.append(Action("F", n_f))
                n_f += 1
        acts += [Action("W", i) for i in range(n_w, m)]
        out.append(acts)
    return out


def _zb_v(p: int, m: int) -> list[list[Action]]:
    """ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism" §6; V-ZB in "Pipeline
    Parallelism with Controllable Memory"): V placement, split backward, m >= p. Ticks below
    are chunk ticks, F=B=W=1: stage s could start at s and, for m >= 2p-1, it never idles
    until it ends at 6m+s (a parallelogram), holding at most 2p chunk activations.

    Warm-up: 2(p-s)-1 F's of chunk 0. Micro-batch 0 reaches virtual stage k at tick k at the
    earliest, so its chunk-1 input (virtual stage 2p-1-s) arrives at tick 2p-1-s; these F's
    fill [s, 2p-1-s), as in ZB-H2. Then s pairs (chunk-1 F, chunk-0 F): stage s+1 alternates
    too, so chunk-1 inputs come every other tick and chunk-0 F's fill the ticks between; one
    more chunk-1 F at 2p+s-1, and the first gradient is there: the loss is on stage 0 (B at
    tick 2p), and it goes down chunk 1 one stage per tick.
    Then units: F, B, W of one chunk (the F of the next micro-batch, the B and W of the
    oldest), so each unit frees the activation it takes. First p-s units of chunk 1: the
    first chunk-0 B runs on stage p-1 at tick 3p+2 (after its chunk-1 unit and a chunk-0 F)
    and climbs one stage per 2 ticks (each stage runs a chunk-0 F before its B), reaching
    stage s at 5p-2s: just when those p-s units (3 ticks each from 2p+s-1) and a chunk-0 F
    are done. Then chunk-0 and chunk-1 units alternate: 6 ticks per micro-batch,
    all of a stage's work, in step with its neighbours.
    Cool-down (F's spent): a unit is B, then the oldest W's while more than 2s are pending.
    Why 2s: stage 0's last B (chunk 0) runs at 6m-2, so stage s must run its last B by
    6m-2-s, and 2s+1 W's fill the ticks from there to 6m+s, mirroring the warm-up F's.
    Memory (F to W): before its first W, stage s has run min(2p-1-s, m) chunk-0 F's and s+1
    chunk-1 F's; each later F is in a unit whose W frees one, and the cool-down runs none:
    peak min(2p, m+s+1) chunk activations, 2p for m >= 2p-1: p micro-batches of a whole
    stage, 1F1B's peak (its stage 0).
    With p <= m < 2p-1, stage 0 runs out of F's before tick 2p-1 and waits 2p-1-m ticks for
    its first chunk-1 input; every stage waits as long and the timeline is still a
    parallelogram. With m < p micro-batches' gradients collide on their way (no simple form,
    and most of each stage's time would be bubble whatever the order): refused.
    """
    out = []
    for s in range(p):
        # (chunk, whole unit?): warm-up F's, then chunk-1/chunk-0 F pairs, then F-B-W units;
        # the last units find nothing left to do
        steps = ([(0, False)] * (2 * (p - s) - 1) + [(1, False), (0, False)] * s
                 + [(1, True)] * (p - s) + [(0, True), (1, True)] * m)
        acts: list[Action] = []
        n_f, n_b = [0, 0], [0, 0]  # F's and B's run so far, per chunk
        owed: list[Action] = []  # W's not run yet, oldest first
        for c, unit in steps:
            if n_f[c] < m:  # none left: a warm-up with m < 2p-1, or the cool-down
                acts.append(Action("F", n_f[c], c))
                n_f[c] += 1
            if unit and n_b[c] < m:
                acts.append(Action("B", n_b[c], c))
                owed.append(Action("W", n_b[c], c))
                n_b[c] += 1
            keep = 2 * s if n_f == [m, m] else 0  # cool-down: defer up to 2s W's
            while len(owed) > keep:
                acts.append(owed.pop(0))
        out.append(acts + owed)
    return out


def _dualpipe_v(p: int, m: int) -> list[list[tuple[Action, ...]]]:
    """DualPipeV (DeepSeek's DualPipe cut in half; the per-rank order of deepseek-ai/DualPipe
    `dualpipev.py` and torch.distributed.pipelining's `ScheduleDualPipeV`), as slots per
    stage. V placement, split backward, m >= 2p. On stage s, counting micro-batches per
    chunk in order (each chunk's F's, B's and W's each run micro-batches 0, 1, ...):

    1. 2(p-s-1) F's of chunk 0 (ZB-V's warm-up less one);
    2. s+1 times: F chunk 0, F chunk 1;
    3. p-s-1 times: B chunk 1, its W, F chunk 1 (zero bubble: three slots);
    4. m-2p+s+1 times: one slot F chunk 0 + full backward (B, W) chunk 1, one slot F chunk 1 +
       full backward chunk 0. DeepSeek's exception: on the last stage the first F chunk 0
       and full backward chunk 1 run in slots of their own (no wait for that backward's
       gradient before the forward);
    5. p-s-1 times: full backward chunk 1, then a slot F chunk 1 + full backward chunk 0;
    6. s+1 times: backward chunk 1, backward chunk 0; the first half full backwards, the
       second half B only (its W deferred, oldest first). DeepSeek switch before the chunk-1
       B of round (s+1)//2 on an odd stage and before its chunk-0 B on an even one: after
       s+1 full backwards either way, so s+1 W's wait;
    7. p-s-1 times: the oldest waiting W, then B chunk 0 (its W waits);
    8. the s+1 W's still waiting.
    """
    return [_dualpipe_v_stage(p, m, s) for s in range(p)]


class _Order:
    """One stage's slots as they are built: F's and B's so far per chunk (each chunk runs its
    micro-batches in order) and the W's deferred, oldest first."""

    def __init__(self):
        self.n_f, self.n_b, self.owed = [0, 0], [0, 0], []

    def fwd(self, c: int) -> tuple[Action, ...]:
        self.n_f[c] += 1
        return (Action("F", self.n_f[c] - 1, c),)

    def bwd(self, c: int, full: bool) -> tuple[Action, ...]:
        """B of chunk c's next micro-batch; full: with its W, else its W is deferred."""
        b, w = Action("B", self.n_b[c], c), Action("W", self.n_b[c], c)
        self.n_b[c] += 1
        if full:
            return b, w
        self.owed.append(w)
        return (b,)

    def weight(self) -> tuple[Action, ...]:
        return (self.owed.pop(0),)


def _dualpipe_v_stage(p: int, m: int, s: int) -> list[tuple[Action, ...]]:
    """Stage s's slots of `_dualpipe_v`, steps 1 to 8."""
    o, slots = _Order(), []
    slots += [o.fwd(0) for _ in range(2 * (p - s - 1))]  # 1
    for _ in range(s + 1):  # 2
        slots += [o.fwd(0), o.fwd(1)]
    for _ in range(p - s - 1):  # 3
        slots += [o.bwd(1, False), o.weight(), o.fwd(1)]
    for i in range(m - 2 * p + s + 1):  # 4
        if i == 0 and s == p - 1:
            slots += [o.fwd(0), o.bwd(1, True)]
        else:
            slots.append(o.fwd(0) + o.bwd(1, True))
        slots.append(o.fwd(1) + o.bwd(0, True))
    for _ in range(p - s - 1):  # 5
        slots += [o.bwd(1, True), o.fwd(1) + o.bwd(0, True)]
    split = False
    for i in range(s + 1):  # 6
        split = split or (i == (s + 1) // 2 and s % 2 == 1)
        slots.append(o.bwd(1, not split))
        split = split or (i == (s + 1) // 2 and s % 2 == 0)
        slots.append(o.bwd(0, not split))
    assert len(o.owed) == s + 1
    for _ in range(p - s - 1):  # 7
        slots += [o.weight(), o.bwd(0, False)]
    slots += [o.weight() for _ in range(s + 1)]  # 8
    assert o.n_f == o.n_b == [m, m] and not o.owed, (p, m, s)
    return slots


def _flatten(stages: list[list[tuple[Action, ...]]]
             ) -> tuple[list[list[Action]], tuple[frozenset[int], ...]]:
    """Per-stage slots -> (action lists, `Schedule.joined`)."""
    actions, joined = [], []
    for slots in stages:
        acts: list[Action] = []
        mine = set()
        for slot in slots:
            mine.update(range(len(acts) + 1, len(acts) + len(slot)))
            acts += slot
        actions.append(acts)
        joined.append(frozenset(mine))
    return actions, tuple(joined)


def make_schedule(name: str, stages: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Build a named schedule for p=`stages`, m=`microbatches`, v=`virtual_stages`; a name
    ending in ".json" is a schedule file (`load_schedule`)."""
    p, m, v = stages, microbatches, virtual_stages
    for flag, value in (("stages", p), ("microbatches", m), ("virtual-stages", v)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(
                f"{flag} must be a positive integer (got {value!r}); use --{flag} 1 or more")
    if name.endswith(".json"):
        return load_schedule(name, p, m, v)
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    if name in ("zb-v", "dualpipe-v") and v != 2:
        raise ScheduleError(f"{name} runs two chunks per stage in a V (got virtual stages {v}); "
                            "use --virtual-stages 2")
    if name not in ("interleaved", "zb-v", "dualpipe-v") and v != 1:
        raise ScheduleError(
            f"{name} runs one chunk per stage (got virtual stages {v}); "
            "use --virtual-stages 1, or --schedule interleaved"
        )
    if name == "interleaved" and m % p:
        raise ScheduleError(
            f"interleaved needs microbatches ({m}) to be a multiple of stages ({p}); "
            f"use --microbatches {-(-m // p) * p}"
        )
    if name == "zb-v" and m < p:
        raise ScheduleError(f"zb-v needs at least as many microbatches as stages (got {m} "
                            f"for {p}); use --microbatches {p} or more")
    if name == "dualpipe-v" and p < 2:
        raise ScheduleError(f"dualpipe-v needs at least 2 stages (got {p}); use --stages 2 or "
                            "more, or --schedule zb-v")
    if name == "dualpipe-v" and m < 2 * p:
        raise ScheduleError(f"dualpipe-v needs at least twice as many microbatches as stages "
                            f"(got {m} for {p}); use --microbatches {2 * p} or more")
    build = {
        "gpipe": lambda: _gpipe(p, m),
        "1f1b": lambda: _one_f_one_b(p, m),
        "interleaved": lambda: _interleaved(p, m, v),
        "zb-h1": lambda: _zb_h1(p, m),
        "zb-h2": lambda: _zb_h2(p, m),
        "zb-v": lambda: _zb_v(p, m),
        "dualpipe-v": lambda: _dualpipe_v(p, m),
    }[name]
    if name == "dualpipe-v":  # slots
        acts, joined = _flatten(build())
    else:
        acts, joined = build(), ()
    schedule = Schedule(
        name=name, stages=p, microbatches=m, virtual_stages=v,
        split_backward=name in ("zb-h1", "zb-h2", "zb-v", "dualpipe-v"),
        actions=tuple(tuple(a) for a in acts),
        placement="v" if name in ("zb-v", "dualpipe-v") else "looped",
        joined=joined,
    )
    validate(schedule)
    return schedule


# ------------------------------------------------------------------ validation


def dependencies(schedule: Schedule, action: Action, stage: int) -> list[tuple[int, Action]]:
    """What `action` on `stage` waits for, as (stage, action) pairs.

    F(mb, k) needs F(mb, k-1); B(mb, k) needs F(mb, k) and B(mb, k+1) (the last virtual stage
    computes the loss right after its F, so it needs only its own F); W(mb, k) needs B(mb, k).
    """
    mb, chunk = action.microbatch, action.chunk
    k = schedule.virtual_stage(stage, chunk)
    if action.kind == "F":
        if k == 0:
            return []
        s_prev, c_prev = schedule.place(k - 1)
        return [(s_prev, Action("F", mb, c_prev))]
    if action.kind == "B":
        deps = [(stage, Action("F", mb, chunk))]
        if k < schedule.stages * schedule.virtual_stages - 1:
            s_next, c_next = schedule.place(k + 1)
            deps.append((s_next, Action("B", mb, c_next)))
        return deps
    return [(stage, Action("B", mb, chunk))]


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless every action runs exactly once and each stage's own order
    can be satisfied. Cross-stage order (deadlock) is checked by `pipeline.simulate`."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual_stages
    if schedule.placement not in PLACEMENTS:
        raise ScheduleError(f"placement {schedule.placement!r} is not supported; use one of "
                            f"{', '.join(PLACEMENTS)}")
    if schedule.placement == "v" and v != 2:
        raise ScheduleError(f"placement 'v' holds two chunks per stage, but virtual_stages is "
                            f"{v}; set virtual_stages to 2, or use placement 'looped'")
    if len(schedule.actions) != p:
        raise ScheduleError(f"schedule has {len(schedule.actions)} action lists for {p} stages; "
                            "give one list per stage")
    kinds = SCHEDULED if schedule.split_backward else SCHEDULED[:2]
    for s, acts in enumerate(schedule.actions):
        position: dict[Action, int] = {}
        for n, a in enumerate(acts):
            if a.kind not in kinds:
                raise ScheduleError(f"stage {s} runs {a}, but this schedule's kinds are "
                                    f"{'/'.join(kinds)}; W needs split_backward=True")
            if not (0 <= a.microbatch < m and 0 <= a.chunk < v):
                raise ScheduleError(f"stage {s} runs {a}: micro-batch must be in 0..{m - 1} "
                                    f"and chunk in 0..{v - 1}")
            if a in position:
                raise ScheduleError(f"stage {s} runs {a} twice (positions {position[a]} and "
                                    f"{n}); keep one")
            position[a] = n
        for mb in range(m):
            for c in range(v):
                for kind in kinds:
                    if Action(kind, mb, c) not in position:
                        raise ScheduleError(f"stage {s} never runs {Action(kind, mb, c)}; "
                                            "add it to its action list")
        for a, n in position.items():
            for dep_stage, dep in dependencies(schedule, a, s):
                if dep_stage == s and position[dep] > n:
                    raise ScheduleError(f"stage {s} runs {a} (position {n}) before {dep} "
                                        f"(position {position[dep]}), which it needs; "
                                        f"move {a} after {dep}")
    _validate_slots(schedule)


def _validate_slots(schedule: Schedule) -> None:
    """`joined`: one set per stage, positions that exist and are >= 1; in a slot at most one
    F, one B and one W, a W only with its own B, and no member needing a slot-mate (but for
    that W). A member that needs a slot-mate through other stages is a deadlock, which
    `pipeline.simulate` reports."""
    p = schedule.stages
    if schedule.joined == ():
        return
    if len(schedule.joined) != p:
        raise ScheduleError(f"joined has {len(schedule.joined)} sets for {p} stages; give one "
                            "per stage, or () for no shared slot")
    for s, joined in enumerate(schedule.joined):
        n_acts = len(schedule.actions[s])
        bad = [n for n in joined
               if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < n_acts]
        if bad:
            n = min(bad, key=lambda x: (not isinstance(x, int), x if isinstance(x, int) else 0))
            raise ScheduleError(f"stage {s} joins position {n!r} to the slot before it; "
                                f"it must be an action's position in 1..{n_acts - 1}")
        for slot in schedule.slots(s):
            if len(slot) == 1:
                continue
            shown = " + ".join(map(str, slot))
            for kind in SCHEDULED:
                same = [a for a in slot if a.kind == kind]
                if len(same) > 1:
                    raise ScheduleError(f"stage {s} runs {same[1]} in one slot with {same[0]} "
                                        f"({shown}); a slot holds at most one F, one B and one "
                                        f"W: unjoin {same[1]}")
            for a in slot:
                if a.kind == "W" and Action("B", a.microbatch, a.chunk) not in slot:
                    raise ScheduleError(f"stage {s} runs {a} in a slot without its B ({shown}); "
                                        f"a W shares a slot only as B{a.microbatch}.{a.chunk} "
                                        f"then {a} (a full backward): unjoin {a}")
                for dep_stage, dep in dependencies(schedule, a, s):
                    if dep_stage == s and dep in slot and a.kind != "W":
                        raise ScheduleError(f"stage {s} runs {a} in one slot with {dep}, which "
                                            f"it needs ({shown}); a slot's members run "
                                            f"independently: unjoin {a}")


# ------------------------------------------------------------------ files


def schedule_to_data(schedule: Schedule) -> dict:
    """The schedule as plain data (what a schedule file holds). An action that shares the
    previous action's slot carries `"joined": true` (no key otherwise)."""
    def row(s: int, n: int, a: Action) -> dict:
        out: dict = {"kind": a.kind, "microbatch": a.microbatch, "chunk": a.chunk}
        if schedule.joined and n in schedule.joined[s]:
            out["joined"] = True
        return out

    return {
        "schedule": schedule.name, "stages": schedule.stages,
        "microbatches": schedule.microbatches, "virtual_stages": schedule.virtual_stages,
        "split_backward": schedule.split_backward, "placement": schedule.placement,
        "actions": [[row(s, n, a) for n, a in enumerate(acts)]
                    for s, acts in enumerate(schedule.actions)],
    }


def _need(where: dict, key: str, what: str, source: str, default=None):
    """`where[key]` (or `default`), an integer unless the key is "kind"."""
    if key not in where and default is None:
        raise ScheduleError(f"{source}: {what} has no {key!r}; add it")
    value = where.get(key, default)
    if key != "kind" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ScheduleError(f"{source}: {what} has {key} {value!r}; it must be an integer")
    return value


def _stage_from_data(acts, s: int, source: str) -> tuple[tuple[Action, ...], frozenset[int]]:
    """Stage s's actions in a schedule file, and the positions that share the previous slot."""
    if not isinstance(acts, list):
        raise ScheduleError(f"{source}: actions of stage {s} must be a list")
    row, mine = [], set()
    for n, a in enumerate(acts):
        what = f"stage {s} action {n}"
        if not isinstance(a, dict):
            raise ScheduleError(f"{source}: {what} is {a!r}; write it as "
                                '{"kind": "F", "microbatch": 0, "chunk": 0}')
        kind = _need(a, "kind", what, source)
        if kind not in SCHEDULED:
            raise ScheduleError(f"{source}: {what} has kind {kind!r}; use F, B or W")
        row.append(Action(kind, _need(a, "microbatch", what, source),
                          _need(a, "chunk", what, source, 0)))
        shared = a.get("joined", False)
        if not isinstance(shared, bool):
            raise ScheduleError(f"{source}: {what} has joined {shared!r}; write true (it "
                                "shares the previous action's slot) or leave it out")
        if shared and n == 0:
            raise ScheduleError(f"{source}: {what} is joined, but a stage's first action "
                                "has no slot before it to share; leave joined out")
        if shared:
            mine.add(n)
    return tuple(row), frozenset(mine)


def schedule_from_data(data: dict, source: str = "schedule") -> Schedule:
    """Inverse of `schedule_to_data` (other keys, such as the ticks `--json` adds, are
    ignored), validated: every action once, each stage's own order, and no deadlock between
    stages in the executor's lockstep ticks. Errors are one line that names `source`."""
    if not isinstance(data, dict) or not isinstance(data.get("actions"), list):
        raise ScheduleError(f"{source}: expected a JSON object with per-stage 'actions' lists, "
                            "as `scripts/schedule.py --json` prints")
    placement = data.get("placement", "looped")  # checked by `validate`, with v
    if not isinstance(placement, str):
        raise ScheduleError(f"{source}: placement {placement!r} must be a string; use one of "
                            f"{', '.join(PLACEMENTS)}")
    parsed = [_stage_from_data(acts, s, source) for s, acts in enumerate(data["actions"])]
    actions, joined = tuple(a for a, _ in parsed), tuple(j for _, j in parsed)
    split = data.get("split_backward", any(a.kind == "W" for acts in actions for a in acts))
    if not isinstance(split, bool):  # bool("false") is True: a string would flip its meaning
        raise ScheduleError(f"{source}: split_backward {split!r} must be true or false (a JSON "
                            "boolean, not a string)")
    name = data.get("schedule", Path(source).stem)
    if not isinstance(name, str):
        raise ScheduleError(f"{source}: schedule {name!r} must be a string (a name to show)")
    sizes = {key: _need(data, key, "the file", source, default)
             for key, default in (("stages", None), ("microbatches", None), ("virtual_stages", 1))}
    for key, value in sizes.items():
        if value < 1:  # no stage or micro-batch to run; later code would fail far from here
            raise ScheduleError(f"{source}: {key} is {value}; it must be 1 or more")
    schedule = Schedule(
        name=name, **sizes, split_backward=split,
        actions=actions, placement=placement, joined=joined if any(joined) else ())
    try:
        validate(schedule)
        from tppjax.pipeline.simulate import simulate  # simulate imports this module

        simulate(schedule, dict.fromkeys(SCHEDULED, 1), lockstep=True)  # raises on a deadlock
    except ScheduleError as err:
        raise ScheduleError(f"{source}: {err}") from None
    return schedule


def read_schedule_file(path: str) -> Schedule:
    """The validated schedule in JSON file `path`."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ScheduleError(f"cannot read schedule file {path}: {err.strerror}; "
                            "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # JSON is UTF-8 text
        raise ScheduleError(f"schedule file {path} is not JSON ({err}); write it as "
                            "`scripts/schedule.py --json` prints") from None
    return schedule_from_data(data, path)


def load_schedule(path: str, stages: int, microbatches: int, virtual_stages: int = 1
                  ) -> Schedule:
    """The schedule in JSON file `path`, checked against the run's p, m and v."""
    schedule = read_schedule_file(path)
    for what, flag, mine, run in (
            ("stages", "the mesh's stage axis", schedule.stages, stages),
            ("micro-batches", "--microbatches", schedule.microbatches, microbatches),
            ("virtual stages", "--virtual-stages", schedule.virtual_stages, virtual_stages)):
        if mine != run:
            raise ScheduleError(f"schedule file {path} has {mine} {what}, but this run has "
                                f"{run}; set {flag} to {mine} or use another file")
    return schedule
