"""What the compiled step executes (`tppjax.measure.census`) against docs/design.md §2's closed forms
(`tppjax.measure.analysis.expected`) for every schedule and the tensor, SP and FSDP layouts; the executed
FLOPs against the model's and, a second way, against each pipeline action compiled alone times
the schedule table; and `scripts/explain.py --json` end to end."""

import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.helpers import BATCH, SEQ, TEST_MODEL, compiled, weight_gathers
from tppjax.measure import analysis, census, hlo
from tppjax.models import Transformer
from tppjax.pipeline.actions import StageActions
from tppjax.pipeline.schedules import SCHEDULES, ActionKind, chunks_needed, make_schedule
from tppjax.pipeline.simulate import simulate
from tppjax.pipeline.table import SENDS, action_counts, plan
from tppjax.spmd.pipelined import head_parts
from tppjax.spmd.rules import batch_shards

ROOT = Path(__file__).resolve().parents[1]
PIPE = "data=2,stage=2,tensor=2"
GPIPE = {"microbatches": 2, "schedule": "gpipe"}
FOUR = dataclasses.replace(TEST_MODEL, n_layers=4)  # interleaved: 2 stages x 2 chunks
THREE = dataclasses.replace(TEST_MODEL, n_layers=3)  # uneven over 2 stages
# Per-layer work and per-tick sends: bytes and executions must equal the closed form exactly.
EXACT = {"attention q/k/v", "attention out", "MLP up/gate", "MLP down",
         "sequence-parallel gather", "pipeline send/recv"}
# Weights moved once per step (or per layer): bytes exactly; XLA moves each parameter apart.
EXACT_BYTES = {"interleaved placement", "FSDP weight gather"}
CASES = {  # id: (mesh, sequence parallel, model, train settings)
    "tensor": ("tensor=8", False, TEST_MODEL, {}),
    "data-tensor-sp": ("data=2,tensor=4", True, TEST_MODEL, {}),
    "fsdp-tensor": ("fsdp=2,tensor=4", False, TEST_MODEL, {}),
    "gpipe": (PIPE, False, TEST_MODEL, GPIPE),
    "1f1b-sp": (PIPE, True, TEST_MODEL, {"microbatches": 2, "schedule": "1f1b"}),
    "zb-h1": (PIPE, False, TEST_MODEL, {"microbatches": 4, "schedule": "zb-h1"}),
    "interleaved": (PIPE, False, FOUR, {"microbatches": 2, "schedule": "interleaved",
                                        "virtual_stages": 2}),
    "1f1b-remat-stage": (PIPE, False, TEST_MODEL, {"microbatches": 2, "schedule": "1f1b",
                                                   "remat": "stage"}),
    "tensor-remat-layer": ("tensor=8", False, TEST_MODEL, {"remat": "layer"}),
    # Uneven stages: every padded slot is in the program, only the real layers run. Split
    # backward (W skips padding too) with layer remat; the interleaved chunks move padded.
    "uneven-zb-h1": (PIPE, False, THREE, {"microbatches": 4, "schedule": "zb-h1",
                                          "remat": "layer", "stage_layers": (2, 1)}),
    "uneven-interleaved": (PIPE, False, THREE, {"microbatches": 2, "schedule": "interleaved",
                                                "virtual_stages": 2,
                                                "stage_layers": (1, 0, 2, 0)}),
}


def executed(case: str):
    """(trainer, executed collectives, closed form, FLOPs) of one case's compiled step."""
    mesh, sp, cfg, kw = CASES[case]
    tr, _, _, text = compiled(mesh, sp, cfg=cfg, **kw)
    tc = tr.tc
    layers = tr.layout.counts if tr.padded else None
    where = (tr.mesh, tc.schedule, tc.microbatches, tc.virtual_stages, layers)
    want = analysis.expected(cfg, dict(tr.mesh.shape), BATCH, SEQ, tc.microbatches, tc.schedule,
                             tc.virtual_stages, sp, tc.remat, layers)
    return tr, census.collectives(text, *where), want, census.flops(text, *where)


def per_key(rows, key):
    """{key: (bytes per step per stage, executions per step per stage)}."""
    out = {}
    for r in rows:
        b, n = out.get(key(r), ((0.0,) * len(r.counts),) * 2)
        out[key(r)] = (tuple(x + r.bytes * c for x, c in zip(b, r.counts, strict=True)),
                       tuple(x + c for x, c in zip(n, r.counts, strict=True)))
    return out


@pytest.mark.parametrize("case", CASES)
def test_census_equals_closed_form(case):
    """Per-layer collectives and sends: per stage, bytes and executions equal the closed form
    (for the pipelines: what the schedule table runs, not every branch on every tick). Per op
    kind and mesh axes, bytes within 1%: XLA combines the once-per-step sums as it likes, and
    the optimizer's gradient-norm partial sums (a few floats) are not in the closed forms, nor
    (FSDP with tensor) the token ids that the partitioner moves for the embedding lookup."""
    _, got, want, _ = executed(case)

    def key(r):
        return r.source, r.phase, r.op, r.axes

    exact_got = per_key([r for r in got if r.source in EXACT], key)
    exact_want = per_key([r for r in want if r.source in EXACT], key)
    assert exact_got == exact_want, (exact_got, exact_want)
    moved_got = {k: b for k, (b, _) in per_key([r for r in got if r.source in EXACT_BYTES],
                                               key).items()}
    assert moved_got == {k: b for k, (b, _) in per_key(
        [r for r in want if r.source in EXACT_BYTES], key).items()}, moved_got
    got_kind, want_kind = census.by_kind(got), census.by_kind(want)
    for k, b in want_kind.items():
        assert abs(got_kind.get(k, 0) - b) <= 0.01 * b, (k, got_kind.get(k), b)
    unexplained = {k: b for k, b in got_kind.items() if k not in want_kind}
    assert sum(unexplained.values()) <= 0.01 * sum(got_kind.values()), unexplained


@pytest.mark.parametrize("case", CASES)
def test_executed_flops_are_the_model_plus_recompute(case):
    """Loop-aware matmul FLOPs of all devices: the model's 6N + 12Lhs per token, plus what
    rematerialisation re-runs, which the census names ("recompute")."""
    cfg = CASES[case][2]
    tr, _, _, flops = executed(case)
    dots = flops["dot"]
    model = analysis.model_flops(cfg, BATCH, SEQ)
    extra = analysis.recompute_flops(cfg, BATCH, SEQ, tr.tc.remat, tr.stages,
                                     tr.tc.virtual_stages, tr.layout.counts if tr.padded else None)
    assert sum(dots.values()) == pytest.approx(model + extra, rel=1e-6), dots
    assert dots["recompute"] == pytest.approx(extra, rel=1e-6, abs=1.0), dots
    assert flops["elementwise"]["F"] > 0


def action_flops(fn, *args) -> float:
    """Matmul FLOPs of `fn` compiled alone on one device."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(f.flops * f.count for f in hlo.flops(text) if f.kind == "dot")


@pytest.mark.parametrize("case", ["gpipe", "zb-h1", "interleaved", "1f1b-remat-stage"])
def test_pipeline_flops_equal_actions_alone_times_the_table(case):
    """A second way to the same figure: compile each action (F, B, W, the last stage's head
    and loss) alone on one device, for one micro-batch of one data shard, and weight it by the
    ticks of the schedule table that run it, on every stage and data shard."""
    cfg = CASES[case][2]
    tr, _, _, flops = executed(case)
    tc, p, d = tr.tc, tr.stages, batch_shards(tr.mesh.shape)
    pl = plan(tc.schedule, p, tc.microbatches, tc.virtual_stages)
    with nnx.use_eager_sharding(False):  # one device: no mesh
        model = Transformer(cfg, nnx.Rngs(0))
    block_def, stacked = nnx.split(model.blocks)
    w = jax.tree.map(lambda a: a[: cfg.n_layers // (p * tc.virtual_stages)], stacked)
    x = jnp.ones((BATCH // d // tc.microbatches, SEQ, cfg.d_model))
    act = StageActions(block_def, tc.remat, pl.split)
    y, stash = act.forward(w, x)
    cost = {"F": action_flops(act.forward, w, x),
            "B": action_flops(act.backward, w, stash, y)}
    if pl.split:
        cost["W"] = action_flops(act.weight_grads, w, act.backward(w, stash, y)[2])
    hp, head_fn = head_parts(model)
    tgt = jnp.zeros(x.shape[:2], jnp.int32)
    head = action_flops(lambda hp, y: jax.value_and_grad(head_fn, (0, 1))(hp, y, tgt), hp, y)
    per_stage = collections.Counter()
    cost[ActionKind.HEAD] = head
    for kind in ActionKind:
        for s, n in enumerate(action_counts(pl).get(kind.scope, ())):
            per_stage[s] += n * cost.get(kind, 0.0)
    assert sum(flops["dot"].values()) == pytest.approx(d * sum(per_stage.values()), rel=1e-6)


def test_no_sharded_weight_is_all_gathered():
    """Weights stay sharded in the pipeline. The check can fail: replicating the MLP down weight
    shows up as its gathers over `tensor` then `stage`, forward and in the gradient's transpose
    (reshaped to [p, L/p, ...]), each named by that parameter alone."""
    assert weight_gathers(PIPE, **GPIPE) == []
    caught = weight_gathers(PIPE, gather="blocks/mlp/w_down", **GPIPE)
    one = ("blocks/mlp/w_down",)
    want = [("all-gather", ("stage",), one), ("all-gather", ("tensor",), one)] * 2
    assert sorted(caught) == sorted(want), caught


def test_pipeline_moves_activations_only():
    """Every send is one micro-batch's activation (or its gradient), over `stage`: GPipe sends
    activations on its first m + p − 2 ticks and gradients on its last m + p − 2."""
    _, got, _, _ = executed("gpipe")
    x_mb = BATCH // 2 // 2 * SEQ * TEST_MODEL.d_model * 4
    sends = [c for c in got if c.op == "collective-permute"]
    n = 2 + 2 - 2
    assert sorted((c.source, c.phase, c.bytes, c.axes, c.counts) for c in sends) == [
        ("pipeline send/recv", phase, x_mb, ("stage",), (n, n)) for phase in "BF"]


def holder(placement: str, p: int, k: int) -> tuple[int, int]:
    """(stage, chunk) of virtual stage k, as the README defines the placements (not
    `Schedule.place`): looped, chunk c of stage s is c·p + s; V, stage s holds s and
    2p − 1 − s."""
    if placement == "v":
        return (k, 0) if k < p else (2 * p - 1 - k, 1)
    return k % p, k // p


def sends_from_actions(sched) -> dict[ActionKind, int]:
    """Per send scope, the ticks on which some stage sends, derived from the schedule's actions
    alone: an F of virtual stage k < pv − 1 hands its activation to the holder of k + 1, a B
    (the input gradient) of k > 0 its gradient to the holder of k − 1, in the tick the action
    runs (lockstep: one slot a tick); nothing moves where both are on one stage (V's turn).
    Kinds by direction (`table.SENDS`): to the next stage (looped: p − 1 to 0 around the
    ring) SEND_F and SEND_B_BACK, to the previous one SEND_F_BACK and SEND_B (on a ring of 2
    stages next and previous are one: named as the next)."""
    p, v = sched.stages, sched.virtual_stages
    ring = sched.placement == "looped" and v > 1
    ticks: dict[ActionKind, set[int]] = collections.defaultdict(set)
    for (s, a), t in simulate(sched, lockstep=True).starts.items():
        k = p * a.chunk + s if sched.placement == "looped" else (s, 2 * p - 1 - s)[a.chunk]
        assert holder(sched.placement, p, k) == (s, a.chunk)  # the two readings agree
        to = {"F": k + 1, "B": k - 1}.get(a.kind)  # W sends nothing
        if to is None or not 0 <= to < p * v:
            continue
        r = holder(sched.placement, p, to)[0]
        if r == s:  # V's turn: handed over within the stage
            continue
        down = r == s + 1 or ring and (s, r) == (p - 1, 0)
        ticks[{("F", True): ActionKind.SEND_F, ("F", False): ActionKind.SEND_F_BACK,
               ("B", True): ActionKind.SEND_B_BACK, ("B", False): ActionKind.SEND_B}[
                   a.kind, down]].add(t)
    return {name: len(t) for name, t in ticks.items()}


SEND_CASES = [(name, p, m) for name in SCHEDULES for p, m in ((2, 4), (4, 8), (3, 6))
              if not (name == "interleaved" and m % p)]


@pytest.mark.parametrize("name,p,m", SEND_CASES)
def test_send_ticks_follow_from_the_actions(name, p, m):
    """The ticks the executor sends on (which the census and the closed forms both count),
    against the schedule's actions: a tick on which no stage sends runs no `ppermute`."""
    v = chunks_needed(name)
    want = sends_from_actions(make_schedule(name, p, m, v))
    assert analysis.send_ticks(name, p, m, v) == want


def unconditional(text: str) -> set[str]:
    """The computations of a compiled program that run whenever their caller does: reached
    from ENTRY without entering a `conditional`'s branches."""
    comps, entry = hlo._parse_computations(text)
    seen, todo = set(), [entry]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for ins in comps[c]:
            if ins.opcode != "conditional":
                todo += re.findall(r"%?([\w.\-]+)", " ".join(
                    [b for _, b in hlo._CALL_ONE.findall(ins.attrs)]
                    + hlo._CALL_MANY.findall(ins.attrs)))
    return seen


@pytest.mark.parametrize("case", ["gpipe", "zb-h1", "interleaved"])
def test_census_sends_equal_the_actions_and_skip_empty_ticks(case):
    """Each send scope of the compiled step runs on exactly the ticks its schedule's actions
    send (`sends_from_actions`), on every stage; and its `ppermute` sits only inside a
    `lax.cond` branch, so the ticks without a send skip it (were it in the tick loop's body
    proper, it would run on every tick, which the census would not see)."""
    tr, got, _, _ = executed(case)
    tc = tr.tc
    want = sends_from_actions(make_schedule(tc.schedule, tr.stages, tc.microbatches,
                                            tc.virtual_stages))
    sends = [r for r in got if r.op == "collective-permute" and r.source == "pipeline send/recv"]
    counted = {ActionKind.in_op(r.name): r.counts for r in sends}
    assert len(counted) == len(sends)
    assert counted == {k: (float(n),) * tr.stages for k, n in want.items()}, (counted, want)
    text = compiled(*CASES[case][:2], cfg=CASES[case][2], **CASES[case][3])[3]
    comps, _ = hlo._parse_computations(text)
    always = unconditional(text)
    where = {c for c, instrs in comps.items() for ins in instrs
             if ins.opcode == "collective-permute" and ActionKind.in_op(ins.attrs) in SENDS}
    assert where and not where & always, sorted(where & always)


def test_explain_json_reports_what_each_stage_runs():
    """The tiny model's 2 layers on 4 stages: uneven, two stages hold no layer (padding only),
    and what each stage runs is still read from the program, equal to the closed forms."""
    m = 2
    cmd = [sys.executable, str(ROOT / "scripts" / "explain.py"), "--mesh", "stage=4,tensor=2",
           "--preset", "tiny", "--json", "--batch-size", "8", "--seq-len", "16", "--schedule",
           "1f1b", "--microbatches", str(m)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    mods = {m["module"]: m for m in report["modules"]}
    layers = [sum(b - a + 1 for a, b in chunks)
              for chunks in report["pipeline_schedule"]["stage_map"]]
    assert sum(layers) == 2 and 0 in layers, layers
    for name in ("attention out", "MLP down"):  # row-parallel: forward, m per layer, per stage
        cols = [c for c in mods[name]["collectives"] if c["op"] == "all-reduce"]
        assert [c["counts"] for c in cols] == [{"F": [m * n for n in layers]}], (name, cols)
    head = [c for c in mods["head"]["collectives"] if c["op"] == "all-reduce"]
    runs = [c["counts"]["head/loss"] for c in head]
    assert runs and all(n[:-1] == [0] * 3 and n[-1] > 0 for n in runs), runs  # the last stage
    sends = {ph for c in report["pipeline"] for ph in c["counts"]}
    assert sends == {"F", "B"}
    for v in report["bytes_by_kind"].values():
        assert abs(v["measured"] - v["analytical"]) <= 0.01 * v["analytical"], v
    assert report["executed_flops"] == pytest.approx(report["model_flops"], rel=1e-6)
    bad = subprocess.run(cmd[:2] + ["--mesh", "tensor=3"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
