"""Context parallelism (ring attention over `context`) equals one device: loss and gradients."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from tests.helpers import (
    BATCH,
    RTOL,
    SEQ,
    TEST_MODEL,
    assert_matches_reference,
    batch,
    loss_and_grads,
    reference,
    rel_err,
    trainer,
)
from tppjax.errors import ConfigError
from tppjax.measure import analysis, census
from tppjax.measure.hlo import collectives
from tppjax.spmd.mesh import parse_mesh_spec
from tppjax.spmd.rules import Rules, check_layout

GPT2 = dataclasses.replace(TEST_MODEL, style="gpt2", tie_embeddings=True)


FOUR = dataclasses.replace(TEST_MODEL, n_layers=4)  # interleaved: 2 stages x 2 chunks


@pytest.mark.parametrize(("mesh", "cfg", "sp", "train"), [
    ("data=4,context=2", TEST_MODEL, False, {}),
    ("data=2,context=4", GPT2, False, {}),
    ("data=2,context=2,tensor=2", TEST_MODEL, True, {}),
    # Inside a pipeline: the gathered ring, under each stage's actions.
    ("context=2,stage=2,tensor=2", TEST_MODEL, False, {"schedule": "1f1b", "microbatches": 2}),
    ("data=2,context=2,stage=2", GPT2, False, {"schedule": "zb-h1", "microbatches": 4}),
    ("context=2,stage=2,tensor=2", FOUR, True, {"schedule": "interleaved", "microbatches": 2,
                                               "virtual_stages": 2}),
    # The other schedules, `context` manual in the pipeline: one table-driven executor.
    ("data=2,context=2,stage=2", TEST_MODEL, False, {"schedule": "gpipe", "microbatches": 2}),
    ("data=2,context=2,stage=2", TEST_MODEL, False, {"schedule": "zb-h2", "microbatches": 4}),
    ("data=2,context=2,stage=2", FOUR, False, {"schedule": "zb-v", "microbatches": 2,
                                              "virtual_stages": 2}),
    ("data=2,context=2,stage=2", FOUR, False, {"schedule": "dualpipe-v", "microbatches": 4,
                                              "virtual_stages": 2}),
], ids=["cp2-llama", "cp4-gpt2", "cp2xtp2-sp", "cp2xtp2xpp2-1f1b", "cp2xdp2xpp2-zb-h1-gpt2",
        "cp2xtp2xpp2-interleaved-sp", "cp2xdp2xpp2-gpipe", "cp2xdp2xpp2-zb-h2",
        "cp2xdp2xpp2-zb-v", "cp2xdp2xpp2-dualpipe-v"])
def test_loss_and_every_gradient_match_single_device(mesh, cfg, sp, train):
    loss, grads = loss_and_grads(cfg, mesh, sp, **train)
    assert_matches_reference(cfg, loss, grads)


def test_ring_sends_match_closed_form_and_bfloat16_runs():
    """The compiled step's collective-permutes over `context` are the ring's, per layer: K, V
    cp−1 hops forward, again backward with dK, dV cp hops, float32 even with bfloat16 compute
    (`analysis.ring_sends`). The same compiled bfloat16 step then runs to a finite loss."""
    cfg = dataclasses.replace(TEST_MODEL, compute_dtype="bfloat16")
    tr = trainer(cfg, "data=2,context=4")
    params, opt_state = tr.init(seed=0)
    inputs, targets = tr.place(batch(cfg))
    step = tr.lower_step(params, opt_state, inputs, targets).compile()
    sends = [c for c in collectives(step.as_text(), tr.mesh) if c.op == "collective-permute"]
    assert sends and all(c.axes == ("context",) for c in sends)
    assert {analysis.attribute(c) for c in sends} == {"attention ring"}
    rows = analysis.ring_sends(cfg, dict(tr.mesh.shape), BATCH, SEQ)
    assert sum(c.total_bytes for c in sends) == sum(r.total_bytes for r in rows)
    assert sum(c.count for c in sends) == sum(r.count for r in rows)
    with jax.set_mesh(tr.mesh):
        metrics = step(params, opt_state, inputs, targets)[2]
    assert np.isfinite(float(metrics["loss"]))


def test_pipelined_evaluation_matches_single_device():
    """Evaluation runs GPipe's forward loop (`pipeline.gpipe`), `context` manual there too: the
    loss of one device."""
    tr = trainer(TEST_MODEL, "data=2,context=2,stage=2", microbatches=2)
    loss = tr.eval_loss(tr.init(seed=0)[0], *tr.place(batch()))
    assert rel_err(float(loss), reference(TEST_MODEL)[0]) <= RTOL


@pytest.mark.parametrize(("mesh", "schedule", "m"), [
    ("data=2,context=2,stage=2", "zb-h1", 4),  # `context` manual in the pipeline
    ("context=2,stage=2,tensor=2", "1f1b", 2),  # automatic there (`Context.gathered`)
], ids=["manual", "gathered"])
def test_pipelined_ring_sends_match_closed_form_and_bfloat16_runs(mesh, schedule, m):
    """Inside a pipeline the ring all-gathers K, V and sends dK, dV home by reduce-scatter (or,
    where `tensor` splits the stages too, all-to-all), per layer and micro-batch; per stage,
    what the schedule table runs (`census`) equals `analysis.expected`'s ring rows exactly:
    none is a collective-permute (which would deadlock XLA CPU under a stage's `lax.cond`).
    With `context` manual its gradient sums are one all-reduce per step, with the data axes'.
    The bfloat16 step runs."""
    cfg = dataclasses.replace(TEST_MODEL, compute_dtype="bfloat16")
    tr = trainer(cfg, mesh, schedule=schedule, microbatches=m)
    params, opt_state = tr.init(seed=0)
    inputs, targets = tr.place(batch(cfg))
    step = tr.lower_step(params, opt_state, inputs, targets).compile()
    got = census.collectives(step.as_text(), tr.mesh, schedule, m)
    want = analysis.expected(cfg, dict(tr.mesh.shape), BATCH, SEQ, m, schedule)

    def per_stage(rows, source="attention ring"):
        out = {}
        for r in rows:
            if r.source == source:
                key = (r.phase, r.op, r.axes, r.bytes)
                out[key] = tuple(a + b for a, b in zip(out.get(key, (0, 0)), r.counts,
                                                       strict=True))
        return out

    assert per_stage(got) and per_stage(got) == per_stage(want), (per_stage(got),
                                                                 per_stage(want))
    if "tensor" not in mesh:
        assert all(r.counts == (1, 1) for r in got if r.source == "gradient reduction"
                   and "context" in r.axes), per_stage(got, "gradient reduction")
    with jax.set_mesh(tr.mesh):
        metrics = step(params, opt_state, inputs, targets)[2]
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize(("mesh", "seq", "message"), [
    ("data=2,context=4", 12, "sequence length (12) is not divisible by the 2 x context axis (8)"),
    ("context=2,tensor=4", 12, "sequence length (sequence parallelism) (12) is not divisible by the context x tensor axis (8)"),
])
def test_bad_context_layouts_are_refused_in_one_line(mesh, seq, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(TEST_MODEL, parse_mesh_spec(mesh), BATCH, seq, Rules(sequence_parallel=True))
