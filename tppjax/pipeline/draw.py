"""Show a simulated schedule: ASCII timeline, JSON, PNG.

Cell notation: `F3` is the forward of micro-batch 3, `B3` its backward (input gradient only
when the backward is split), `W3` its weight gradient, `.` an idle tick. With more than one
chunk per stage (v > 1) the chunk follows a dot: `F3.1` is micro-batch 3 through chunk 1 of
the stage, i.e. virtual stage 1·p + s (looped placement) or 2p-1-s (V placement). An action
that lasts c ticks shows its label in each of its c columns.
Shared slots (dualpipe-v's overlapped forward and backward, `Schedule.joined`): an action
that runs in the previous action's slot is marked `+`: `F4.0 +B0.1 +W0.1` is one slot of
three ticks; with lockstep timing (one tick a slot) the whole slot is one cell,
`F4.0+B0.1+W0.1`.
The PNG uses one colour per kind, lighter for later chunks, with `3` / `3.1` in the box; a
shared slot has a thick black border around its members (DeepSeek's drawing of overlapped
F&B), its members stacked in its one tick with lockstep timing.
"""
from __future__ import annotations

from pathlib import Path

from tppjax.pipeline.schedules import SCHEDULED, Action, ActionKind, schedule_to_data
from tppjax.pipeline.simulate import Simulation, closed_form

COLORS = dict(zip(SCHEDULED, ("#4C72B0", "#DD8452", "#55A868"), strict=True))  # F, B, W


def label(action: Action | None, virtual_stages: int) -> str:
    """`F3`, or `F3.1` when there is more than one chunk; `.` for idle."""
    if action is None:
        return "."
    text = f"{action.kind}{action.microbatch}"
    return f"{text}.{action.chunk}" if virtual_stages > 1 else text


def cell_labels(sim: Simulation, stage: int) -> dict[Action, str]:
    """What each action of `stage` shows in its cells: its label, `+` before it when it
    shares the previous action's slot; lockstep: a slot's first action shows the whole slot
    (`F4.0+B0.1+W0.1`)."""
    v = sim.schedule.virtual_stages
    out = {}
    for slot in sim.schedule.slots(stage):
        texts = [label(a, v) for a in slot]
        if sim.lockstep:
            out[slot[0]] = "+".join(texts)
        else:
            out.update(zip(slot, [texts[0]] + ["+" + x for x in texts[1:]], strict=True))
    return out


def ascii_timeline(sim: Simulation) -> str:
    """One row per stage, one aligned column per tick, plus a tick header."""
    rows = []
    for s in range(sim.schedule.stages):
        cells = cell_labels(sim, s)
        rows.append([cells[a] if a is not None else label(None, 1)
                     for a in (sim.table[t][s] for t in range(sim.ticks))])
    width = max([len(str(sim.ticks - 1))] + [len(c) for row in rows for c in row])
    head = "tick".ljust(9) + " ".join(str(t).rjust(width) for t in range(sim.ticks))
    lines = [head]
    for s, row in enumerate(rows):
        lines.append(f"stage {s}".ljust(9) + " ".join(c.rjust(width) for c in row))
    return "\n".join(lines)


def summary(sim: Simulation) -> str:
    """Simulated figures, each next to its closed form (`simulate.closed_form`; "-" for a
    schedule that has none)."""
    sch = sim.schedule
    cf = None if sim.lockstep else closed_form(sch)  # the closed forms are for costs in order
    costs = " ".join(f"{k}={c}" for k, c in sim.costs.items())
    timing = ("lockstep: one tick per slot" if sim.lockstep
              else f"costs {costs} ticks per chunk action")
    shared = sum(len(slot) > 1 for s in range(sch.stages) for slot in sch.slots(s))

    def formula(key: str, spec: str = "", s: int | None = None) -> str:
        value = "-" if cf is None else cf[key] if s is None else cf[key][s]
        return f"{value:>13{spec if cf else ''}}"

    lines = [
        (f"{sch.name}: p={sch.stages} m={sch.microbatches} v={sch.virtual_stages}"
         f"{'' if sch.placement == 'looped' else ' placement ' + sch.placement}"
         f"{f' ({shared} shared slots)' if shared else ''} ({timing})"),
        f"{'':22}{'simulated':>10}{'closed form':>13}",
        f"{'ticks':22}{sim.ticks:>10}{formula('ticks')}",
        f"{'period':22}{sim.period:>10}{formula('period')}",
        f"{'ideal ticks':22}{sim.ideal_ticks:>10}",
        f"{'bubble fraction':22}{sim.bubble_fraction:>10.4f}{formula('bubble_fraction', '.4f')}",
        f"{'bubble ratio':22}{sim.bubble_ratio:>10.4f}{formula('bubble_ratio', '.4f')}",
        f"{'stage':<8}{'bubble':>8}{'peak in-flight':>16}{'closed form':>13}",
    ]
    for s in range(sch.stages):
        lines.append(f"{s:<8}{sim.stage_bubble[s]:>8.4f}{sim.peak_inflight[s]:>16}"
                     f"{formula('peak_inflight', s=s)}")
    return "\n".join(lines)


def to_json(sim: Simulation) -> dict:
    """Plain-data view of the simulation: the schedule as a schedule file holds it
    (`schedules.schedule_to_data`), plus the start tick of every action and the figures."""
    data = schedule_to_data(sim.schedule)
    for s, acts in enumerate(sim.schedule.actions):
        for a, row in zip(acts, data["actions"][s], strict=True):
            row["tick"] = sim.starts[(s, a)]
    lockstep = {"lockstep": True} if sim.lockstep else {}  # ticks are slots
    return {**data, "ticks": sim.ticks, "bubble_fraction": sim.bubble_fraction,
            "peak_inflight": list(sim.peak_inflight), **lockstep}


def save_png(sim: Simulation, path: str | Path) -> None:
    """Draw the timeline as coloured boxes (F/B/W) labelled with micro-batch numbers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("save_png needs matplotlib: pip install matplotlib") from err
    sch = sim.schedule
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * sim.ticks + 1.5), 0.5 * sch.stages + 1.2))
    for s in range(sch.stages):
        for slot in sch.slots(s):
            t_slot = sim.starts[(s, slot[0])]
            for i, a in enumerate(slot):
                t0, cost = sim.starts[(s, a)], sim.costs[a.kind]
                y0, height = s - 0.4, 0.8
                if sim.lockstep:  # the slot's one tick, its members stacked
                    y0, height = s - 0.4 + 0.8 * i / len(slot), 0.8 / len(slot)
                ax.add_patch(plt.Rectangle(
                    (t0, y0), cost, height, facecolor=COLORS[a.kind], edgecolor="black",
                    linewidth=0.5,
                    alpha=1.0 - 0.35 * a.chunk / max(1, sch.virtual_stages - 1)))
                text = label(a, sch.virtual_stages)[1:]  # the colour already says the kind
                ax.text(t0 + cost / 2, y0 + height / 2, text, ha="center", va="center",
                        fontsize=7 if len(slot) == 1 or not sim.lockstep else 5)
            if len(slot) > 1:  # a shared slot: one thick border around its members
                width = (1 if sim.lockstep else
                         sum(sim.costs[a.kind] for a in slot))
                ax.add_patch(plt.Rectangle((t_slot, s - 0.45), width, 0.9, fill=False,
                                           edgecolor="black", linewidth=2.0))
    ax.set_xlim(0, sim.ticks)
    ax.set_ylim(sch.stages - 0.5, -0.5)  # stage 0 on top
    ax.set_yticks(range(sch.stages), [f"stage {s}" for s in range(sch.stages)])
    ax.set_xlabel("tick")
    kinds = [k for k in COLORS if k != ActionKind.W or sch.split_backward]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in kinds]
    ax.legend(handles, kinds,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"{sch.name}: p={sch.stages} m={sch.microbatches} v={sch.virtual_stages}, "
                 f"{sim.ticks} {'lockstep ' if sim.lockstep else ''}ticks, "
                 f"bubble {sim.bubble_fraction:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
