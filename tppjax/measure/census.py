"""What one train step executes, per stage: every collective and every FLOP of the compiled
program, weighted by how often it really runs.

`tppjax.measure.hlo` multiplies loop trip counts but cannot know which branch of a `lax.cond` runs: it
counts every branch on every trip. The pipeline executor (`pipeline.executor`) runs the actions
of one slot per tick on each stage, picked from its table (`pipeline.table`), and names each
action's ops by its kind (`ActionKind.scope`: F, head, B, W and the sends). So an op of kind
a, counted c times by `tppjax.measure.hlo` (once per tick of the loop, times any inner trip
count), runs c · n_a(s) / ticks times on stage s, where n_a(s) is the number of ticks that
stage s runs a: the table decides, not the design. A send runs only on the ticks where a
stage receives by it.

Each op gets a phase from the kind that runs it (`ActionKind.phase`: F, B, W, head/loss; a
send's is what it carries; within B, a forward re-run is "recompute") or, outside the
executor, from its name (a transpose is backward); the once-per-step sums after the loop and
the optimizer's are "step".
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from tppjax.measure import analysis, hlo
from tppjax.pipeline.layout import ACTIVE_SCOPE
from tppjax.pipeline.schedules import ActionKind
from tppjax.pipeline.table import SENDS

_ACTIVE = re.compile(rf"(?:^|[/(]){ACTIVE_SCOPE}(?=[/)]|$)")
PHASES = ("F", "B", "W", "head/loss", "recompute", "step")


@dataclasses.dataclass(frozen=True)
class Executed:
    """One collective as the step runs it."""
    source: str                 # `analysis.attribute`
    phase: str                  # one of PHASES
    op: str
    bytes: int                  # per device, one execution
    axes: tuple[str, ...]
    counts: tuple[float, ...]   # executions per step on each stage (one entry: no pipeline)
    name: str

    @property
    def count(self) -> float:
        """Executions per step per device, the mean over stages."""
        return float(np.mean(self.counts))

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.count


def action_ticks(schedule: str, stages: int, microbatches: int, virtual_stages: int,
                 stage_layers=None):
    """(ticks, {action scope: [p] ticks that each stage runs it}) of the executor's table, or
    None without a pipeline. `stage_layers`: real layers per virtual stage, for uneven stages
    (`pipeline.table.action_counts`)."""
    if stages == 1:
        return None
    from tppjax.pipeline.table import action_counts, plan

    pl = plan(schedule, stages, microbatches, virtual_stages)
    return pl.ticks, action_counts(pl, stage_layers)


def _counts(name: str, count: int, ticks, p: int) -> tuple[float, ...]:
    """Per stage executions of an op that `tppjax.measure.hlo` counts `count` times. A layer of an uneven
    stage (`ACTIVE_SCOPE`: `tppjax.measure.hlo` counts it on every padded slot) by its real layers."""
    kind = ActionKind.in_op(name)
    if ticks is None or kind is None:
        return (float(count),) * p
    n, per_stage = ticks
    scope = kind.scope
    if _ACTIVE.search(name) and f"{scope}/{ACTIVE_SCOPE}" in per_stage:
        scope = f"{scope}/{ACTIVE_SCOPE}"
    return tuple(float(count * r / n) for r in per_stage[scope])


def phase(name: str, source: str) -> str:
    """The phase an op belongs to (see the module docstring)."""
    if source in ("gradient reduction", "pipeline boundary"):
        return "step"
    kind = ActionKind.in_op(name)
    if kind in SENDS:
        return kind.phase
    if "rematted_computation" in name:
        return "recompute"
    if kind == ActionKind.F and source in ("head", "loss"):
        return ActionKind.HEAD.phase
    if kind == ActionKind.B and "transpose(" not in name:
        # B rebuilds the pullback: anything of its own that is not a transpose is a re-run
        # forward (remat "stage" re-runs the stage under `jax.checkpoint`).
        return "recompute"
    if kind is not None:
        return kind.phase
    first = name.split(":")[0]
    if not re.search(r"jvp|transpose", first):
        return "step"  # outside the model's forward and backward: the optimizer's sums
    return "B" if "transpose(" in first else "F"


def collectives(compiled_text: str, mesh, schedule: str = "gpipe", microbatches: int = 1,
                virtual_stages: int = 1, stage_layers=None) -> list[Executed]:
    """Every collective of a compiled train step with its executions on each stage."""
    p = mesh.shape["stage"]
    ticks = action_ticks(schedule, p, microbatches, virtual_stages, stage_layers)
    out = []
    for c in hlo.collectives(compiled_text, mesh):
        if not c.axes:  # groups of one device each: XLA kept it, but it moves nothing
            continue
        source = analysis.attribute(c)
        out.append(Executed(source, phase(c.name, source), c.op, c.bytes, c.axes,
                            _counts(c.name, c.count, ticks, p), c.name))
    return out


def flops(compiled_text: str, mesh, schedule: str = "gpipe", microbatches: int = 1,
          virtual_stages: int = 1, stage_layers=None) -> dict[str, dict[str, float]]:
    """{"dot" | "elementwise": {phase: FLOPs per step of all devices together}}."""
    p = mesh.shape["stage"]
    ticks = action_ticks(schedule, p, microbatches, virtual_stages, stage_layers)
    out = {"dot": dict.fromkeys(PHASES, 0.0), "elementwise": dict.fromkeys(PHASES, 0.0)}
    for f in hlo.flops(compiled_text):
        source = analysis.source_of(f.name)
        # Every device runs the program; a stage's devices (mesh.size / p of them) its counts.
        runs = sum(_counts(f.name, f.count, ticks, p)) * mesh.size / p
        out[f.kind][phase(f.name, source)] += f.flops * runs
    return out


def by_kind(rows) -> dict[tuple[str, tuple[str, ...]], float]:
    """Bytes per device per step by (op kind, mesh axes); the interleaved placement's moves are
    their own kind: XLA's partitioner picks all-to-alls or collective-permutes for them."""
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for r in rows:
        key = (r.source if r.source == "interleaved placement" else r.op, r.axes)
        out[key] = out.get(key, 0.0) + r.total_bytes
    return out
