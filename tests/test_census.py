"""Measured collectives of the compiled step against DESIGN section 2's closed forms
(`spmd.analysis`), and `scripts/explain.py --json` end to end."""

import json
import subprocess
import sys
from pathlib import Path

from spmd import analysis
from tests.helpers import BATCH, SEQ, TEST_MODEL, compiled, weight_gathers

ROOT = Path(__file__).resolve().parents[1]
PIPE = "data=2,stage=2,tensor=2"
GPIPE = {"microbatches": 2, "schedule": "gpipe"}


def expected(tr, sequence_parallel=False):
    tc = tr.tc
    return analysis.expected(TEST_MODEL, dict(tr.mesh.shape), BATCH, SEQ, tc.microbatches,
                             tc.schedule, tc.virtual_stages, sequence_parallel)


def test_tensor_only_bytes_match_closed_form():
    tr, measured, _ = compiled("tensor=8")
    got, want = analysis.by_kind(measured), analysis.by_kind(expected(tr))
    assert set(got) == set(want) == {"all-reduce"}, (got, want)
    for kind in want:  # 5%: the loss's all-reduce also carries the gradient-norm partial sums
        assert abs(got[kind] - want[kind]) <= 0.05 * want[kind], (kind, got[kind], want[kind])
    sources = {analysis.attribute(c) for c in measured}
    assert sources == {"embedding", "attention q/k/v", "attention out", "MLP up/gate",
                       "MLP down", "head", "loss"}, sources


def test_sequence_parallel_bytes_per_layer():
    """As lowered on CPU: every reduce-scatter is all-reduce(X) + dynamic-slice, so each layer
    holds 4 all-reduces of X (2 fwd row-parallel, 2 bwd column-parallel) and 4 all-gathers of X
    (2 fwd before column-parallel inputs, 2 bwd as the reduce-scatters' transposes)."""
    tr, measured, _ = compiled("data=2,tensor=4", sequence_parallel=True)
    got, want = analysis.by_kind(measured), analysis.by_kind(expected(tr, True))
    for kind in ("all-reduce", "all-gather"):
        assert abs(got[kind] - want[kind]) <= 0.05 * want[kind], (kind, got[kind], want[kind])
    x = BATCH // 2 * SEQ * TEST_MODEL.d_model * 4  # the data shard's X
    in_layers = [c for c in measured if "while/body" in c.name and c.axes == ("tensor",)]
    for op in ("all-reduce", "all-gather"):
        per_layer = sum(c.total_bytes for c in in_layers if c.op == op and c.bytes == x)
        assert per_layer == 4 * x * TEST_MODEL.n_layers, (op, per_layer)
    assert not [c for c in measured if c.op == "reduce-scatter"]  # CPU lowering, see above


def test_no_sharded_weight_is_all_gathered():
    """Weights stay sharded in the pipeline: its all-gathers (the micro-batch resharding inside
    `shard_map`) move activations only. The check can fail: replicating the MLP down weight
    shows up as its gathers over `tensor` then `stage`, forward and in the gradient's transpose
    (reshaped to [p, L/p, ...]), each named by that parameter alone."""
    assert [c for c in compiled(PIPE, **GPIPE)[1] if c.op == "all-gather"]
    assert weight_gathers(PIPE, **GPIPE) == []
    caught = weight_gathers(PIPE, gather="blocks/mlp/w_down", **GPIPE)
    one = ("blocks/mlp/w_down",)
    want = [("all-gather", ("stage",), one), ("all-gather", ("tensor",), one)] * 2
    assert sorted(caught) == sorted(want), caught


def test_pipeline_moves_activations_only():
    tr, measured, _ = compiled(PIPE, **GPIPE)
    x_mb = BATCH // 2 // 2 * SEQ * TEST_MODEL.d_model * 4
    permutes = [c for c in measured if c.op == "collective-permute"]
    assert permutes and all(c.bytes == x_mb and c.axes == ("stage",) for c in permutes), permutes
    assert {analysis.attribute(c) for c in permutes} == {"pipeline send/recv"}
    want = analysis.by_kind(expected(tr))["collective-permute"]
    assert analysis.by_kind(measured)["collective-permute"] == want


def test_explain_json_reports_row_parallel_collectives():
    cmd = [sys.executable, str(ROOT / "scripts" / "explain.py"), "--mesh",
           "data=2,stage=2,tensor=2", "--preset", "tiny", "--json", "--batch-size", "8",
           "--seq-len", "16"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    mods = {m["module"]: m for m in report["modules"]}
    for name in ("attention out", "MLP down"):
        assert [c for c in mods[name]["collectives"]
                if c["op"] == "all-reduce" and c["axes"] == ["tensor"] and c["count_fwd"]], name
    assert report["pipeline"] and "timeline" in report["pipeline_schedule"]
    bad = subprocess.run(cmd[:2] + ["--mesh", "tensor=3"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
