"""Schedules as data: generators, validator, simulator, drawings and CLI (pure Python, fast).

Every expected number here comes from a formula written in this file, never from a run of
the program: GPipe/1F1B (Huang et al. 2019; Narayanan et al. 2021), interleaved 1F1B
(Narayanan et al. 2021, bubble ratio (p-1)/(v·m)), ZB-H1 (Qi et al. 2024, a third of
1F1B's bubble at 1F1B's peak memory), ZB-H2 (Qi et al. 2024, no gap inside any stage's
span at up to 2p-1 micro-batches), ZB-V (Qi et al. 2024, V placement: no gap inside any
stage's span at 2p chunk activations, 1F1B's peak memory), DualPipeV (DeepSeek-AI 2024,
torch's ScheduleDualPipeV: the eight steps written out again here; ZB-V's step at 2p+1
chunk activations, DeepSeek's PP+1).
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from tppjax.pipeline.draw import ascii_timeline, save_png, summary, to_json
from tppjax.pipeline.schedules import (
    SCHEDULES,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    chunks_needed,
    make_schedule,
)
from tppjax.pipeline.simulate import closed_form, simulate
from tppjax.pipeline.table import NO_SLOT, SENDS, plan

REPO = Path(__file__).resolve().parents[1]
PS = range(1, 9)
MS = range(1, 33)


def idle_fraction(sim) -> Fraction:
    idle = sum(row.count(None) for row in sim.table)
    return Fraction(idle, sim.schedule.stages * sim.ticks)


def lifetimes(sim) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(stage, mb, chunk) -> [F start, end of last backward): what must stay in memory."""
    sch, last = sim.schedule, "W" if sim.schedule.split_backward else "B"
    out = {}
    for s in range(sch.stages):
        for a in sch.actions[s]:
            if a.kind == "F":
                done = Action(last, a.microbatch, a.chunk)
                out[(s, a.microbatch, a.chunk)] = (
                    sim.starts[(s, a)], sim.starts[(s, done)] + sim.costs[last])
    return out


def overlap_peak(spans: list[tuple[int, int]]) -> int:
    """Max number of half-open intervals alive at once (sweep; ends before starts on ties)."""
    events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    return peak


def layer_map(sch) -> dict[tuple[int, int], int]:
    """(stage, chunk) -> virtual stage, written out here from the placement's definition."""
    p, v = sch.stages, sch.virtual_stages
    if sch.placement == "v":  # down the stages with chunk 0, back up with chunk 1
        return {**{(s, 0): s for s in range(p)}, **{(s, 1): 2 * p - 1 - s for s in range(p)}}
    return {(s, c): c * p + s for s in range(p) for c in range(v)}


def check_timing(sim) -> None:
    """Independent check of the tick model: stage order kept, no overlap on a stage, and
    every action starts after the actions it needs have ended."""
    sch = sim.schedule
    p, v = sch.stages, sch.virtual_stages
    where = layer_map(sch)
    holder = {k: key for key, k in where.items()}
    end = {key: t + sim.costs[key[1].kind] for key, t in sim.starts.items()}
    for s, acts in enumerate(sch.actions):
        for prev, cur in zip(acts, acts[1:]):
            assert sim.starts[(s, cur)] >= end[(s, prev)], (s, prev, cur)
        for a in acts:
            k, mb = where[(s, a.chunk)], a.microbatch
            needs = []
            if a.kind == "F" and k > 0:
                ps, pc = holder[k - 1]
                needs.append((ps, Action("F", mb, pc)))
            if a.kind == "B":
                needs.append((s, Action("F", mb, a.chunk)))
                if k < p * v - 1:
                    ns, nc = holder[k + 1]
                    needs.append((ns, Action("B", mb, nc)))
            if a.kind == "W":
                needs.append((s, Action("B", mb, a.chunk)))
            for d in needs:
                assert sim.starts[(s, a)] >= end[d], (s, a, d)


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_1f1b_bubble_and_memory(name):
    for p in PS:
        for m in MS:
            sim = simulate(make_schedule(name, p, m))
            assert sim.ticks == 3 * (m + p - 1), (p, m)  # F=1, B=2
            assert idle_fraction(sim) == Fraction(p - 1, m + p - 1), (p, m)
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
            want = [m] * p if name == "gpipe" else [min(p - s, m) for s in range(p)]
            assert list(sim.peak_inflight) == want, (p, m)


def test_backward_cost_generalises():
    """GPipe with B = b·F: makespan (m+p-1)(1+b) (fill + drain of each direction)."""
    for b in (1, 3):
        for p in (1, 3, 5):
            for m in (1, 4, 9):
                for name in ("gpipe", "1f1b"):
                    sim = simulate(make_schedule(name, p, m), costs={"F": 1, "B": b})
                    assert sim.ticks == (m + p - 1) * (1 + b), (name, p, m, b)


def test_interleaved_bubble_ratio():
    """(ticks - ideal)/ideal == (p-1)/(v·m), exact on the whole range the generator accepts
    (m a multiple of p, so m >= p), v = 1..4."""
    for p in PS:
        for v in range(1, 5):
            for m in range(p, 33, p):
                sim = simulate(make_schedule("interleaved", p, m, v))
                ideal = 3 * v * m  # v chunk-forwards (1 tick) and chunk-backwards (2) per mb
                assert sim.ideal_ticks == ideal
                assert Fraction(sim.ticks - ideal, ideal) == Fraction(p - 1, v * m), (p, v, m)
                # memory: warm-up (v-1)p + p-s-1 forwards, plus the one in the steady phase
                assert list(sim.peak_inflight) == [v * p - s for s in range(p)], (p, v, m)


def test_interleaved_v1_is_1f1b():
    for p in PS:
        for m in range(p, 33, p):
            assert (make_schedule("interleaved", p, m).actions
                    == make_schedule("1f1b", p, m).actions)


def test_zb_h1_third_of_1f1b_bubble_same_peak():
    """Unit costs F=B=W=1, so 1F1B's B (=B+W) costs 2 and its bubble is 3(p-1) ticks.
    ZB-H1: p-1 ticks when m >= p. When m < p stage 0 waits 2p-1 ticks for the first
    gradient and then has 2m ticks of B and W: 2m+2p-1 ticks, more than a third."""
    for p in PS:
        for m in MS:
            zb = simulate(make_schedule("zb-h1", p, m))
            ob = simulate(make_schedule("1f1b", p, m))
            assert zb.ideal_ticks == ob.ideal_ticks == 3 * m
            assert zb.ticks == max(3 * m + p - 1, 2 * m + 2 * p - 1), (p, m)
            zb_bubble, ob_bubble = zb.ticks - 3 * m, ob.ticks - 3 * m
            if m >= p:
                assert 3 * zb_bubble == ob_bubble, (p, m)
                # a third of the bubble *time* (and ratio to ideal); the idle *fraction*
                # (p-1)/(3m+p-1) is a bit more than a third of 1F1B's, its makespan is shorter
                assert 3 * zb.bubble_ratio == pytest.approx(ob.bubble_ratio, abs=1e-12)
                assert idle_fraction(zb) == Fraction(p - 1, 3 * m + p - 1)
            # held from F until W: every stage within 1F1B's peak (stage 0's), and equal to it
            assert max(zb.peak_inflight) == max(ob.peak_inflight) == min(p, m), (p, m)
            assert all(x <= min(p, m) for x in zb.peak_inflight)


def test_zb_h2_zero_bubble_at_2p_minus_1():
    """F=B=W=1. One step can take no fewer ticks than max(3m+p-1, 2m+2p-1): the last stage
    starts at p-1 with 3m of work, stage 0 gets its first gradient at 2p-1 and then has 2m.
    ZB-H1 already takes that; ZB-H2 takes the same, but moves every idle tick before a
    stage's first action or after its last (a parallelogram), so with steps back to back its
    period is 3m, no bubble, for m >= 2p-1 (ZB-H1's: 3m+p-1). Memory min(m, 2p-1) per stage."""
    for p in PS:
        for m in MS:
            h2 = simulate(make_schedule("zb-h2", p, m))
            h1 = simulate(make_schedule("zb-h1", p, m))
            ob = simulate(make_schedule("1f1b", p, m))
            assert h2.ideal_ticks == 3 * m
            assert h2.ticks == h1.ticks == max(3 * m + p - 1, 2 * m + 2 * p - 1), (p, m)
            assert h2.period == max(3 * m, 2 * m + 2 * p - 1), (p, m)
            assert h1.period == h1.ticks and ob.period == ob.ticks, (p, m)
            if m >= 2 * p - 1:  # zero bubble: every stage busy from its first tick to its last
                spans = [[t for t, row in enumerate(h2.table) if row[s] is not None]
                         for s in range(p)]
                assert all(t == list(range(s, s + 3 * m)) for s, t in enumerate(spans)), (p, m)
            if m > p > 1:  # a smaller bubble than ZB-H1's once steps overlap; equal at m <= p
                assert h2.period < h1.period, (p, m)
            else:
                assert h2.period == h1.period, (p, m)
            assert h2.peak_inflight == (min(m, 2 * p - 1),) * p, (p, m)
            assert max(h2.peak_inflight) <= 2 * p - 1
            assert max(h2.peak_inflight) >= max(ob.peak_inflight) == max(h1.peak_inflight)
            if m > p > 1:
                assert max(h2.peak_inflight) > max(ob.peak_inflight), (p, m)


def test_zb_v_zero_bubble_at_1f1b_memory():
    """V placement, F=B=W=1 per chunk action, so a stage's work is 6m chunk ticks and a
    whole-stage action (ZB-H1's tick) is 2 of them. Lower bounds for any schedule: a step
    takes >= 6m+p-1 (stage p-1 starts at p-1); a stage's span is >= 6m, and >= 5m+2p-1 on
    stage 0 (its first chunk-1 input comes 2p-1 ticks after its first F, 5m of work left).
    ZB-V meets them: stage s spans [s, s+period), period max(6m, 5m+2p-1), every tick busy
    for m >= 2p-1 (zero bubble when steps run back to back); its step bubble p-1 chunk
    ticks is half of ZB-H1's p-1 whole-stage ticks. Memory min(2p, m+s+1) chunk
    activations: 2p, i.e. p micro-batches of a whole stage, 1F1B's peak, for m >= 2p-1."""
    for p in PS:
        for m in range(p, 33):  # any m >= p, multiples of p or not
            zv = simulate(make_schedule("zb-v", p, m, 2))
            h1 = simulate(make_schedule("zb-h1", p, m))
            ob = simulate(make_schedule("1f1b", p, m))
            period = max(6 * m, 5 * m + 2 * p - 1)
            assert zv.ideal_ticks == 6 * m == 2 * h1.ideal_ticks
            assert (zv.ticks, zv.period) == (period + p - 1, period), (p, m)
            spans = [[t for t, row in enumerate(zv.table) if row[s] is not None]
                     for s in range(p)]
            assert [(t[0], t[-1] + 1) for t in spans] == [
                (s, s + period) for s in range(p)], (p, m)
            if m >= 2 * p - 1:
                assert all(t == list(range(s, s + 6 * m)) for s, t in enumerate(spans)), (p, m)
                assert zv.ticks - 6 * m == p - 1 == (2 * h1.ticks - 6 * m) // 2, (p, m)
                assert zv.period < 2 * h1.period or p == 1, (p, m)
            assert zv.peak_inflight == tuple(min(2 * p, m + s + 1) for s in range(p)), (p, m)
            # a chunk activation is half a stage's: within 1F1B's (and ZB-H1's) peak, p
            assert max(zv.peak_inflight) <= 2 * max(ob.peak_inflight) == 2 * p, (p, m)
            assert max(zv.peak_inflight) == 2 * max(h1.peak_inflight) or m < 2 * p - 1, (p, m)


def test_v_placement_maps_the_chunks():
    """Chunk 0 down the stages, chunk 1 back up: virtual stages p-1 and p on stage p-1, the
    loss (2p-1) on stage 0; `place` inverts `virtual_stage`; looped is unchanged."""
    for p in PS:
        for name, v in (("zb-v", 2), ("interleaved", 3), ("1f1b", 1)):
            sch = make_schedule(name, p, 3 * p, v)
            where = layer_map(sch)
            assert sorted(where.values()) == list(range(p * v))
            for (s, c), k in where.items():
                assert sch.virtual_stage(s, c) == k and sch.place(k) == (s, c), (name, p, s, c)
        zv = make_schedule("zb-v", p, p, 2)
        assert zv.placement == "v" and zv.split_backward
        assert zv.place(p - 1) == (p - 1, 0) and zv.place(p) == (p - 1, 1)
        assert zv.place(2 * p - 1) == (0, 1)


def dualpipe_v_slots(p: int, m: int, s: int) -> list[str]:
    """Stage s's slots as kinds and chunks ("F0", "F0+B1+W1": F chunk 0 with the full backward
    of chunk 1), written out from DualPipeV's eight steps (torch ScheduleDualPipeV)."""
    fb0, fb1 = "F0+B1+W1", "F1+B0+W0"
    # step 6: 2(s+1) backwards, chunk 1 then 0; torch switches to B only before round
    # (s+1)//2's chunk-1 B (odd s) or its chunk-0 B (even s): after s+1 full backwards either way
    six = [f"B{1 - k % 2}" + (f"+W{1 - k % 2}" if k < s + 1 else "") for k in range(2 * (s + 1))]
    return (["F0"] * 2 * (p - s - 1)                                    # 1
            + ["F0", "F1"] * (s + 1)                                    # 2
            + ["B1", "W1", "F1"] * (p - s - 1)                          # 3
            + (["F0", "B1+W1", fb1] if s == p - 1 else [fb0, fb1])      # 4, first round
            + [fb0, fb1] * (m - 2 * p + s)                              # 4, the rest
            + ["B1+W1", fb1] * (p - s - 1)                              # 5
            + six                                                       # 6
            + ["W?", "B0"] * (p - s - 1)                                # 7
            + ["W?"] * (s + 1))                                         # 8


def test_dualpipe_v_is_deepseeks_order():
    """Slot by slot, the eight steps of DualPipeV; each chunk's F's, B's and W's in micro-batch
    order; the deferred W's (steps 7, 8) oldest first; only step 4's and 5's slots and the
    full backwards are shared."""
    for p in range(2, 7):
        for m in range(2 * p, 2 * p + 6):
            sch = make_schedule("dualpipe-v", p, m, 2)
            assert (sch.placement, sch.split_backward, sch.virtual_stages) == ("v", True, 2)
            assert len(sch.joined) == p
            for s in range(p):
                slots = sch.slots(s)
                got = ["+".join(f"{a.kind}{a.chunk}" for a in slot) for slot in slots]
                want = dualpipe_v_slots(p, m, s)
                assert len(got) == len(want) == 2 * m + 5 * p - 2 * s - 2 + (s == p - 1)
                assert all(g == w or (w == "W?" and g[0] == "W") for g, w in zip(got, want)), (
                    p, m, s, got, want)
                assert [a for slot in slots for a in slot] == list(sch.actions[s])
                for kind in "FBW":
                    for c in (0, 1):
                        mbs = [a.microbatch for a in sch.actions[s] if (a.kind, a.chunk) == (
                            kind, c)]
                        assert mbs == list(range(m)), (p, m, s, kind, c)
                deferred = [a for slot in slots if len(slot) == 1 and slot[0].kind == "W"
                            for a in slot][p - s - 1:]  # steps 7, 8 (after step 3's)
                order = [a for a in sch.actions[s] if a.kind == "B" and Action(
                    "W", a.microbatch, a.chunk) in deferred]
                assert deferred == [Action("W", b.microbatch, b.chunk) for b in order]


TORCH_DUALPIPEV = Path(__file__).parent / "fixtures" / "torch_dualpipev.json"


def in_torch_notation(sch, s: int) -> list[str]:
    """Stage s's slots as torch prints its `_Action`s: virtual stage (V: stage s holds s and
    2p − 1 − s), kind, micro-batch; a B alone is torch's input gradient "I", a B with its own
    W the full backward "B", a slot F + full backward torch's OVERLAP_F_B."""
    p = sch.stages

    def one(a, kind=None) -> str:
        return f"{(s, 2 * p - 1 - s)[a.chunk]}{kind or a.kind}{a.microbatch}"

    def full(b, w) -> bool:
        return (b.kind, w.kind, b.microbatch, b.chunk) == ("B", "W", w.microbatch, w.chunk)

    out = []
    for slot in sch.slots(s):
        if len(slot) == 1:
            out.append(one(slot[0], "I" if slot[0].kind == "B" else None))
        elif len(slot) == 2 and full(*slot):
            out.append(one(slot[0]))
        elif len(slot) == 3 and slot[0].kind == "F" and full(*slot[1:]):
            out.append(f"({one(slot[0])};{one(slot[1])})OVERLAP_F_B")
        else:
            out.append("+".join(map(str, slot)))  # matches nothing torch prints
    return out


def test_dualpipe_v_is_torchs_order():
    """Rank by rank, action by action, the order that torch's own `ScheduleDualPipeV` builds
    (`_calculate_single_rank_operations`, run from torch 2.9.1's source by
    `scripts/torch_dualpipev.py`), including torch's (and DeepSeek's) two separate actions
    for the last rank's first forward and full backward of step 4."""
    data = json.loads(TORCH_DUALPIPEV.read_text())
    assert data["source"]["function"] == "ScheduleDualPipeV._calculate_single_rank_operations"
    assert len(data["orders"]) >= 4
    for size, ranks in data["orders"].items():
        p, m = (int(x.split("=")[1]) for x in size.split(","))
        sch = make_schedule("dualpipe-v", p, m, 2)
        assert len(ranks) == p
        for s, want in enumerate(ranks):
            assert in_torch_notation(sch, s) == want, (size, s)


def test_dualpipe_v_closed_form_and_deepseek_memory():
    """F=B=W=1 per chunk action, a slot's members one after another (F+B+W: 3 ticks). A step
    takes 6m+p-1 ticks, the least any V schedule can (ZB-V's); every stage s runs from tick s
    to the step's end (period 6m+p-1; ZB-V's 6m); peak 2p+1 chunk activations on every stage:
    DeepSeek's PP+1 for PP = 2p virtual stages (ZB-V: 2p). Lockstep (one tick a slot):
    2m+5p-2 ticks, stage 0's slot count, against ZB-V's 6m+p-1."""
    for p in range(2, 7):
        for m in range(2 * p, 2 * p + 6):
            sch = make_schedule("dualpipe-v", p, m, 2)
            sim, zv = simulate(sch), simulate(make_schedule("zb-v", p, m, 2))
            cf = closed_form(sch)
            assert (sim.ticks, sim.period, sim.ideal_ticks) == (6 * m + p - 1,) * 2 + (6 * m,)
            assert (cf["ticks"], cf["period"], cf["peak_inflight"]) == (
                sim.ticks, sim.period, sim.peak_inflight), (p, m)
            assert cf["bubble_fraction"] == pytest.approx(sim.bubble_fraction)
            assert idle_fraction(sim) == Fraction(p - 1, 6 * m + p - 1)
            assert sim.ticks == zv.ticks and sim.period == zv.period + p - 1, (p, m)
            spans = [[t for t, row in enumerate(sim.table) if row[s] is not None]
                     for s in range(p)]
            assert [(t[0], t[-1] + 1) for t in spans] == [(s, sim.ticks) for s in range(p)]
            assert sim.peak_inflight == (2 * p + 1,) * p
            assert max(zv.peak_inflight) == 2 * p
            lock = simulate(sch, lockstep=True)
            assert lock.ticks == 2 * m + 5 * p - 2, (p, m)
            assert lock.peak_inflight == (2 * p + 1,) * p
            assert simulate(make_schedule("zb-v", p, m, 2), lockstep=True).ticks == zv.ticks
    assert simulate(make_schedule("dualpipe-v", 4, 8, 2), lockstep=True).ticks == 34
    assert simulate(make_schedule("zb-v", 4, 8, 2), lockstep=True).ticks == 51


def test_chunks_needed():
    assert {n: chunks_needed(n) for n in SCHEDULES} == {
        "gpipe": 1, "1f1b": 1, "interleaved": 2, "zb-h1": 1, "zb-h2": 1, "zb-v": 2,
        "dualpipe-v": 2}
    for name in SCHEDULES:
        if name != "interleaved":  # which runs any v; the rest exactly this one
            p = 2
            make_schedule(name, p, 2 * p, chunks_needed(name))


def test_closed_form_matches_simulation():
    for name in SCHEDULES:
        for p in (1, 2, 3, 4, 7):
            vs = {"interleaved": (1, 2, 3), "zb-v": (2,), "dualpipe-v": (2,)}.get(name, (1,))
            for v in vs:
                ms = {"interleaved": range(p, 25, p), "zb-v": range(p, 25),
                      "dualpipe-v": range(2 * p, 25) if p > 1 else ()}.get(name, range(1, 20))
                for m in ms:
                    sim = simulate(make_schedule(name, p, m, v))
                    cf = closed_form(sim.schedule)
                    assert cf["ticks"] == sim.ticks, (name, p, m, v)
                    assert cf["period"] == sim.period, (name, p, m, v)
                    assert cf["peak_inflight"] == sim.peak_inflight, (name, p, m, v)
                    assert cf["bubble_fraction"] == pytest.approx(sim.bubble_fraction)


# ------------------------------------------------------------------ simulator invariants


def all_small_schedules():
    for name in SCHEDULES:
        for p in (1, 2, 3, 4, 5, 8):
            for m in (1, 2, 3, 4, 5, 8, 12, 16):
                if name == "interleaved":
                    if m % p == 0:
                        for v in (1, 2, 3):
                            yield make_schedule(name, p, m, v)
                elif name == "zb-v":
                    if m >= p:
                        yield make_schedule(name, p, m, 2)
                elif name == "dualpipe-v":
                    if m >= 2 * p > 2:
                        yield make_schedule(name, p, m, 2)
                else:
                    yield make_schedule(name, p, m)


def test_timing_respects_dependencies():
    for sch in all_small_schedules():
        sim = simulate(sch)
        check_timing(sim)
        busy = [sum(row[s] is not None for row in sim.table) for s in range(sch.stages)]
        assert busy == [sim.ideal_ticks] * sch.stages
        assert sim.stage_bubble == tuple((sim.ticks - b) / sim.ticks for b in busy)


def test_slots_never_collide_and_match_peak():
    for sch in all_small_schedules():
        sim = simulate(sch)
        life = lifetimes(sim)
        assert set(sim.slots) == set(life)
        for s in range(sch.stages):
            mine = [(key, span) for key, span in life.items() if key[0] == s]
            peak = overlap_peak([span for _, span in mine])
            assert sim.peak_inflight[s] == peak, (sch.name, s)
            assert max(sim.slots[key] for key, _ in mine) + 1 == peak, (sch.name, s)
            for i, (k1, (b1, e1)) in enumerate(mine):
                for k2, (b2, e2) in mine[i + 1:]:
                    if sim.slots[k1] == sim.slots[k2]:
                        assert e1 <= b2 or e2 <= b1, (sch.name, k1, k2)


def test_lockstep_is_unit_costs_without_shared_slots():
    """Every built-in schedule but dualpipe-v shares no slot: lockstep timing (one tick a
    slot, the executor's) is the simulation at F=B=W=1 (F=B=1 unsplit), figure for figure."""
    for sch in all_small_schedules():
        if sch.name == "dualpipe-v":
            continue
        assert sch.joined == ()
        unit = dict.fromkeys("FBW" if sch.split_backward else "FB", 1)
        lock, ref = simulate(sch, {"F": 1, "B": 2, "W": 5}, lockstep=True), simulate(sch, unit)
        assert lock.starts == ref.starts and lock.table == ref.table, (sch.name, sch.stages)
        assert (lock.ticks, lock.period, lock.peak_inflight, lock.slots, lock.ideal_ticks,
                lock.bubble_fraction, dict(lock.costs)) == (
            ref.ticks, ref.period, ref.peak_inflight, ref.slots, ref.ideal_ticks,
            ref.bubble_fraction, unit)
        assert lock.lockstep and not ref.lockstep


def test_lockstep_runs_a_slot_in_one_tick():
    """dualpipe-v in lockstep: a slot's members share its tick, one slot a tick per stage,
    each slot after what its members need from outside it has ended; the table shows each
    slot's first action."""
    for p in (2, 3, 5):
        for m in (2 * p, 2 * p + 3):
            sch = make_schedule("dualpipe-v", p, m, 2)
            sim = simulate(sch, lockstep=True)
            where = layer_map(sch)
            holder = {k: key for key, k in where.items()}
            for s in range(p):
                slots = sch.slots(s)
                ticks = [sim.starts[(s, slot[0])] for slot in slots]
                assert ticks == sorted(set(ticks)), (p, m, s)
                for slot, t0 in zip(slots, ticks):
                    assert {sim.starts[(s, a)] for a in slot} == {t0}
                    assert sim.table[t0][s] == slot[0]
                    for a in slot:
                        k, mb = where[(s, a.chunk)], a.microbatch
                        needs = []
                        if a.kind == "F" and k > 0:
                            needs.append((holder[k - 1][0], Action("F", mb, holder[k - 1][1])))
                        if a.kind == "B":
                            needs.append((s, Action("F", mb, a.chunk)))
                            if k < 2 * p - 1:
                                needs.append((holder[k + 1][0],
                                              Action("B", mb, holder[k + 1][1])))
                        if a.kind == "W":
                            needs.append((s, Action("B", mb, a.chunk)))
                        for d in needs:
                            if not (d[0] == s and d[1] in slot):
                                assert sim.starts[d] + 1 <= t0, (p, m, s, a, d)
                busy = sum(row[s] is not None for row in sim.table)
                assert busy == len(slots)


# ------------------------------------------------------------------ validator


def with_actions(sch: Schedule, stage: int, acts: list[Action]) -> Schedule:
    rows = list(sch.actions)
    rows[stage] = tuple(acts)
    return Schedule(sch.name, sch.stages, sch.microbatches, sch.virtual_stages,
                    sch.split_backward, tuple(rows))


def test_validator_rejects_broken_schedules():
    base = make_schedule("1f1b", 2, 3)
    acts = list(base.actions[0])
    broken = {
        "twice": acts + [acts[0]],
        "never": acts[:-1],
        "before": [Action("B", 0)] + [a for a in acts if a != Action("B", 0)],
        "W needs": acts + [Action("W", 0)],  # W in an unsplit schedule
        "micro-batch must be": acts + [Action("F", 3)],
    }
    for words, bad in broken.items():
        with pytest.raises(ScheduleError, match=words) as err:
            simulate(with_actions(base, 0, bad))
        assert "\n" not in str(err.value)
    zb = make_schedule("zb-h1", 2, 3)
    w_first = [Action("W", 0)] + [a for a in zb.actions[1] if a != Action("W", 0)]
    with pytest.raises(ScheduleError, match="before"):
        simulate(with_actions(zb, 1, w_first))
    for placement, v, words in (("v", 1, ("placement 'v' holds two chunks per stage, but "
                                  "virtual_stages is 1; set virtual_stages to 2")),
                                ("v", 3, "virtual_stages is 3"),
                                ("zigzag", 1, "placement 'zigzag' is not supported")):
        odd = make_schedule("interleaved", 2, 4, v) if v > 1 else base
        with pytest.raises(ScheduleError, match=words) as err:
            simulate(Schedule(odd.name, odd.stages, odd.microbatches, v, odd.split_backward,
                              odd.actions, placement))
        assert "\n" not in str(err.value)


def joined_schedule(stage_acts: dict[int, list[tuple[Action, ...]]], base=None) -> Schedule:
    """`base` (dualpipe-v p=2 m=4) with some stages' slots replaced."""
    base = base or make_schedule("dualpipe-v", 2, 4, 2)
    slots = [stage_acts.get(s, base.slots(s)) for s in range(base.stages)]
    acts = tuple(tuple(a for slot in st for a in slot) for st in slots)
    joined = []
    for st in slots:
        mine, n = set(), 0
        for slot in st:
            mine.update(range(n + 1, n + len(slot)))
            n += len(slot)
        joined.append(frozenset(mine))
    return Schedule(base.name, base.stages, base.microbatches, base.virtual_stages,
                    base.split_backward, acts, base.placement, tuple(joined))


def regroup(slots: list[tuple[Action, ...]], merge: list[Action]) -> list[tuple[Action, ...]]:
    """The actions in `merge` taken out of their slots into one slot, at the first one's place
    (their old slot-mates stay, after it)."""
    first = next(n for n, slot in enumerate(slots) if set(slot) & set(merge))
    out = []
    for n, slot in enumerate(slots):
        if n == first:
            out.append(tuple(merge))
        left = tuple(a for a in slot if a not in merge)
        if left:
            out.append(left)
    return out


def test_joined_slots_are_validated():
    """One line naming the action: a W only with its own B; at most one F, B, W a slot; no
    member needing a slot-mate (but W its B); joined positions that exist and are >= 1."""
    base = make_schedule("dualpipe-v", 2, 4, 2)
    assert joined_schedule({}) == base
    s0 = base.slots(0)
    F, B, W = (lambda mb, c, k=k: Action(k, mb, c) for k in "FBW")
    lone_w = next(x for x in s0 if x[0].kind == "W")[0]  # step 3: W0.1 alone
    cases = {
        # W0.1 joined to the F after it (its B is in the slot before)
        "in a slot without its B": regroup(s0, [lone_w, F(1, 1)]),
        "at most one F, one B and one W": regroup(s0, [F(1, 0), F(2, 0)]),
        # B0.1 needs F0.1, on the same stage
        "which it needs": regroup(s0, [F(0, 1), B(0, 1)]),
    }
    for words, slots in cases.items():
        sch = joined_schedule({0: slots})
        with pytest.raises(ScheduleError, match=words) as err:
            simulate(sch)
        message = str(err.value)
        assert "\n" not in message and message.startswith("stage 0 runs "), message
    # a W after its B in one slot is a full backward: valid
    assert simulate(joined_schedule({0: regroup(s0, [B(0, 1), W(0, 1)])})).ticks > 0
    for joined, words in (((frozenset({0}), frozenset()), "joins position 0"),
                          ((frozenset({99}), frozenset()), "joins position 99"),
                          ((frozenset(),), "joined has 1 sets for 2 stages")):
        odd = Schedule(base.name, 2, 4, 2, True, base.actions, "v", joined)
        with pytest.raises(ScheduleError, match=words) as err:
            simulate(odd)
        assert "\n" not in str(err.value)


def test_a_slot_waiting_on_a_mate_through_other_stages_deadlocks():
    """p=2, stage 0: F0.1 (virtual stage 3, the loss) in one slot with B0.0 (virtual stage 0).
    Neither needs the other directly, so the validator passes it, but B0.0 needs stage 1's
    B0.0, which needs B0.1 here, which needs F0.1 from this same slot: the slot can never
    start, and the simulator says so, naming the whole slot."""
    base = make_schedule("dualpipe-v", 2, 4, 2)
    full_b = [Action("B", 0, 0), Action("W", 0, 0)]
    sch = joined_schedule({0: regroup(base.slots(0), [Action("F", 0, 1)] + full_b)})
    with pytest.raises(ScheduleError, match=(r"deadlock: stage \d is stuck at .*\+.*waiting "
                                             "for")) as err:
        simulate(sch)
    assert "\n" not in str(err.value)


def test_simulator_reports_deadlock():
    """Stage 1 wants F1 first, but stage 0 sends F1 only after B0, which needs stage 1's B0."""
    sch = Schedule("custom", 2, 2, 1, False, (
        (Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)),
        (Action("F", 1), Action("F", 0), Action("B", 0), Action("B", 1)),
    ))
    with pytest.raises(ScheduleError, match=r"deadlock: stage \d is stuck at"):
        simulate(sch)


@pytest.mark.parametrize("args, words", [
    (("nope", 4, 8), "gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, dualpipe-v"),
    (("dualpipe-v", 4, 8), (r"dualpipe-v runs two chunks per stage in a V \(got virtual "
                            r"stages 1\); use --virtual-stages 2")),
    (("dualpipe-v", 4, 7, 2), (r"twice as many microbatches as stages \(got 7 for 4\); "
                               "use --microbatches 8")),
    (("dualpipe-v", 1, 4, 2), r"at least 2 stages \(got 1\); use --stages 2"),
    (("zb-v", 4, 8), (r"zb-v runs two chunks per stage in a V \(got virtual stages 1\); "
                      "use --virtual-stages 2")),
    (("zb-v", 4, 8, 3), "use --virtual-stages 2"),
    (("zb-v", 4, 3, 2), (r"at least as many microbatches as stages \(got 3 for 4\); "
                         "use --microbatches 4")),
    (("zb-h2", 4, 8, 2), "virtual stages 2"),
    (("1f1b", 0, 8), "stages"),
    (("1f1b", 4, -1), "microbatches"),
    (("interleaved", 4, 6, 2), r"multiple of stages \(4\); use --microbatches 8"),
    (("gpipe", 4, 8, 2), "virtual stages 2"),
])
def test_make_schedule_errors(args, words):
    with pytest.raises(ScheduleError, match=words) as err:
        make_schedule(*args)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ drawing, JSON, CLI


def test_to_json_shape():
    sim = simulate(make_schedule("interleaved", 2, 4, 2))
    out = json.loads(json.dumps(to_json(sim)))
    assert list(out) == ["schedule", "stages", "microbatches", "virtual_stages",
                         "split_backward", "placement", "actions", "ticks", "bubble_fraction",
                         "peak_inflight"]
    assert (out["schedule"], out["stages"], out["microbatches"], out["virtual_stages"]) == (
        "interleaved", 2, 4, 2)
    assert len(out["peak_inflight"]) == len(out["actions"]) == 2
    for stage in out["actions"]:
        assert len(stage) == 2 * 4 * 2  # F and B for each (micro-batch, chunk)
        assert all(set(a) == {"kind", "microbatch", "chunk", "tick"} for a in stage)
        ticks = [a["tick"] for a in stage]
        assert ticks == sorted(ticks) and max(ticks) < out["ticks"]


def test_ascii_timeline_aligned():
    sim = simulate(make_schedule("zb-h1", 3, 4))
    lines = ascii_timeline(sim).splitlines()
    assert len(lines) == 1 + 3
    assert len({len(line) for line in lines}) == 1
    cells = lines[1].split()[2:]  # drop "stage 0"
    assert len(cells) == sim.ticks
    assert cells.count(".") == round(sim.stage_bubble[0] * sim.ticks)
    assert {"F0", "B0", "W0"} <= set(cells)
    il = ascii_timeline(simulate(make_schedule("interleaved", 2, 2, 2)))
    assert "F1.1" in il
    zv = simulate(make_schedule("zb-v", 3, 5, 2))
    lines = ascii_timeline(zv).splitlines()
    assert len({len(line) for line in lines}) == 1
    cells = lines[1].split()[2:]  # stage 0: both chunks, each action labelled with its chunk
    assert len(cells) == zv.ticks
    assert {f"{k}{i}.{c}" for k in "FBW" for i in range(5) for c in (0, 1)} <= set(cells)


def test_ascii_timeline_shows_shared_slots():
    """A member of the previous action's slot is marked `+`; lockstep: one cell per slot."""
    sch = make_schedule("dualpipe-v", 2, 4, 2)
    for lockstep in (False, True):
        sim = simulate(sch, lockstep=lockstep)
        lines = ascii_timeline(sim).splitlines()
        assert len(lines) == 3 and len({len(line) for line in lines}) == 1
        cells = lines[1].split()[2:]
        assert len(cells) == sim.ticks
        if lockstep:  # stage 0, step 4: F3.0 with the full backward of micro-batch 1, chunk 1
            assert "F3.0+B1.1+W1.1" in cells and not any(c.startswith("+") for c in cells)
        else:
            n = cells.index("F3.0")
            assert cells[n:n + 3] == ["F3.0", "+B1.1", "+W1.1"]
    head = summary(simulate(sch, lockstep=True)).splitlines()[0]
    assert "shared slots" in head and "lockstep" in head
    assert "shared" not in summary(simulate(make_schedule("zb-v", 2, 4, 2))).splitlines()[0]


def test_summary_shows_period_beside_its_closed_form():
    for sch in (make_schedule("zb-v", 4, 8, 2), make_schedule("zb-h2", 4, 8),
                make_schedule("1f1b", 4, 8)):
        sim = simulate(sch)
        rows = {line[:22].strip(): line[22:].split() for line in summary(sim).splitlines()}
        want = str(closed_form(sch)["period"])
        assert rows["period"] == [str(sim.period), want], rows["period"]
    assert "placement v" in summary(simulate(make_schedule("zb-v", 2, 3, 2))).splitlines()[0]


def test_save_png(tmp_path):
    path = tmp_path / "t.png"
    save_png(simulate(make_schedule("zb-h1", 3, 4)), path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    for lockstep in (False, True):
        save_png(simulate(make_schedule("dualpipe-v", 2, 4, 2), lockstep=lockstep), path)
        assert path.read_bytes()[:4] == b"\x89PNG"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/schedule.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_timeline():
    res = run_cli("--schedule", "1f1b", "--stages", "4", "--microbatches", "8")
    assert res.returncode == 0, res.stderr
    assert "stage 3" in res.stdout and "F7" in res.stdout and "bubble fraction" in res.stdout
    res = run_cli("--schedule", "zb-h1", "--stages", "2", "--microbatches", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ticks"] == 3 * 3 + 2 - 1


def test_cli_dualpipe_v_prints_joined():
    """--virtual-stages 2 (or its default for dualpipe-v); --json marks the shared slots;
    --lockstep times one tick a slot."""
    args = ("--schedule", "dualpipe-v", "--stages", "2", "--microbatches", "4")
    res = run_cli(*args, "--virtual-stages", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    sch = make_schedule("dualpipe-v", 2, 4, 2)
    assert out["ticks"] == 6 * 4 + 2 - 1 and out["placement"] == "v"
    for s, rows in enumerate(out["actions"]):
        assert {n for n, row in enumerate(rows) if row.get("joined")} == sch.joined[s]
        assert all(row.get("joined", True) is True for row in rows)
    res = run_cli(*args, "--lockstep")
    assert res.returncode == 0, res.stderr
    assert "F3.0+B1.1+W1.1" in res.stdout and "lockstep" in res.stdout


@pytest.mark.parametrize("args", [
    ("--schedule", "bogus", "--stages", "4", "--microbatches", "8"),
    ("--schedule", "interleaved", "--stages", "4", "--microbatches", "6",
     "--virtual-stages", "2"),
    ("--schedule", "1f1b", "--stages", "four", "--microbatches", "8"),
    ("--schedule", "dualpipe-v", "--stages", "4", "--microbatches", "6"),
])
def test_cli_bad_input(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_one_spelling_of_an_action_kind():
    """The letter of a schedule file is the kind (`Action("F", 0)` holds ActionKind.F), and
    every kind's scope reads back as that kind from an op's name, whole segments only (a
    send's scope is a prefix of its `_back` twin's)."""
    assert Action("F", 0).kind is ActionKind.F and str(Action("W", 2, 1)) == "W2.1"
    for kind in ActionKind:
        assert ActionKind.in_op(f"jit(step)/while/body/{kind.scope}/dot_general") is kind
        assert ActionKind.in_op(f"jit(step)/{kind.scope}x/add") is None
    assert ActionKind.in_op("jit(step)/while/body/transpose(jvp(mlp_up))") is None


def run_table(pl, p):
    """Run the executor's table (`pipeline.table`) on labels instead of arrays, in the
    executor's order (F, HEAD, B, W, then the sends and V's turn): a slot holds the
    (micro-batch, virtual stage) of what was written into it, and each read must find a
    value of the kind and virtual stage it expects, B's stash and gradient of one
    micro-batch. Returns what ran: {(kind, micro-batch, virtual stage): times}."""
    tab, ran = pl.table, collections.Counter()
    x, g, stash, kept = ([{} for _ in range(p)] for _ in range(4))
    y, dx = [None] * p, [None] * p
    last = pl.virtual.size - 1
    for t in range(pl.ticks):
        for s in range(p):
            if tab.runs[ActionKind.F][t, s]:
                mb, k = tab.microbatch[t, s], pl.virtual[s, tab.chunk[ActionKind.F][t, s]]
                if not tab.first[t, s]:
                    assert x[s].pop(tab.x_read[t, s]) == (mb, k - 1), (t, s)
                assert tab.stash_write[t, s] not in stash[s], (t, s)  # nothing live overwritten
                stash[s][tab.stash_write[t, s]], y[s] = (mb, k), (mb, k)
                ran["F", mb, k] += 1
            if tab.runs[ActionKind.HEAD][t, s]:
                assert y[s][1] == last and tab.g_write[t, s] not in g[s], (t, s)
                g[s][tab.g_write[t, s]] = y[s]
            if tab.runs[ActionKind.B][t, s]:
                k = pl.virtual[s, tab.chunk[ActionKind.B][t, s]]
                mb, k_g = g[s].pop(tab.g_read[t, s])
                assert k_g == k and stash[s].pop(tab.stash_read[t, s]) == (mb, k), (t, s)
                assert (tab.dx_row[t, s] == mb) if k == 0 else tab.dx_row[t, s] == NO_SLOT
                if pl.split:
                    assert tab.kept_write[t, s] not in kept[s], (t, s)
                    kept[s][tab.kept_write[t, s]] = (mb, k)
                dx[s], ran["B", mb, k] = (mb, k - 1), ran["B", mb, k] + 1
            if tab.runs[ActionKind.W][t, s]:
                k = pl.virtual[s, tab.chunk[ActionKind.W][t, s]]
                mb, k_w = kept[s].pop(tab.kept_read[t, s])
                assert k_w == k, (t, s)
                ran["W", mb, k] += 1
        for s in range(p):
            for buf, slot, value in ((x, tab.x_turn, y), (g, tab.g_turn, dx)):
                if slot[t, s] != NO_SLOT:
                    assert slot[t, s] not in buf[s], (t, s)
                    buf[s][slot[t, s]] = value[s]
            for kind, (buffer, down) in SENDS.items():
                slot = tab.arrive[kind][t, s]
                if slot != NO_SLOT:
                    sender = (s - 1) % p if down else (s + 1) % p
                    buf, value = (x, y) if buffer == "x" else (g, dx)
                    assert slot not in buf[s], (t, s, kind)
                    buf[s][slot] = value[sender]
    return ran


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_table_runs_every_action_once_on_what_it_needs(name):
    """Every schedule's table, run on labels (`run_table`): each F reads the output of the
    virtual stage before it, each B its own stash and the gradient from the one after it (or
    its head), each W what its B kept; nothing live is overwritten; every action runs once."""
    p, m, v = 4, 8, chunks_needed(name)
    pl = plan(name, p, m, v)
    kinds = "FBW" if pl.split else "FB"
    want = {(kind, mb, k): 1 for kind in kinds for mb in range(m) for k in range(p * v)}
    assert run_table(pl, p) == want
