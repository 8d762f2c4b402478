"""Schedules as data: generators, validator, simulator, drawings and CLI (pure Python, fast).

Every expected number here comes from a formula written in this file, never from a run of
the program: GPipe/1F1B (Huang et al. 2019; Narayanan et al. 2021), interleaved 1F1B
(Narayanan et al. 2021, bubble ratio (p-1)/(v·m)), ZB-H1 (Qi et al. 2024, a third of
1F1B's bubble at 1F1B's peak memory), ZB-H2 (Qi et al. 2024, no gap inside any stage's
span at up to 2p-1 micro-batches), ZB-V (Qi et al. 2024, V placement: no gap inside any
stage's span at 2p chunk activations, 1F1B's peak memory).
"""
from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.draw import ascii_timeline, save_png, summary, to_json
from pipeline.schedules import SCHEDULES, Action, Schedule, ScheduleError, make_schedule
from pipeline.simulate import closed_form, simulate

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


def test_closed_form_matches_simulation():
    for name in SCHEDULES:
        for p in (1, 2, 3, 4, 7):
            vs = {"interleaved": (1, 2, 3), "zb-v": (2,)}.get(name, (1,))
            for v in vs:
                ms = {"interleaved": range(p, 25, p), "zb-v": range(p, 25)}.get(name, range(1, 20))
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


def test_simulator_reports_deadlock():
    """Stage 1 wants F1 first, but stage 0 sends F1 only after B0, which needs stage 1's B0."""
    sch = Schedule("custom", 2, 2, 1, False, (
        (Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)),
        (Action("F", 1), Action("F", 0), Action("B", 0), Action("B", 1)),
    ))
    with pytest.raises(ScheduleError, match=r"deadlock: stage \d is stuck at"):
        simulate(sch)


@pytest.mark.parametrize("args, words", [
    (("nope", 4, 8), "gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v"),
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


@pytest.mark.parametrize("args", [
    ("--schedule", "bogus", "--stages", "4", "--microbatches", "8"),
    ("--schedule", "interleaved", "--stages", "4", "--microbatches", "6",
     "--virtual-stages", "2"),
    ("--schedule", "1f1b", "--stages", "four", "--microbatches", "8"),
])
def test_cli_bad_input(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
