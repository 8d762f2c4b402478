"""Context parallelism (ring attention over `context`) equals one device: loss and gradients."""

import dataclasses

import pytest

from tests.helpers import BATCH, SEQ, TEST_MODEL, assert_matches_reference, compiled, loss_and_grads
from tppjax.measure import analysis

GPT2 = dataclasses.replace(TEST_MODEL, style="gpt2", tie_embeddings=True)


@pytest.mark.parametrize(("mesh", "cfg", "sp"), [
    ("data=4,context=2", TEST_MODEL, False),
    ("data=2,context=4", GPT2, False),
    ("data=2,context=2,tensor=2", TEST_MODEL, True),
], ids=["cp2-llama", "cp4-gpt2", "cp2xtp2-sp"])
def test_loss_and_every_gradient_match_single_device(mesh, cfg, sp):
    loss, grads = loss_and_grads(cfg, mesh, sp)
    assert_matches_reference(cfg, loss, grads)


def test_ring_sends_match_closed_form():
    """The compiled step's collective-permutes over `context` are the ring's, per layer: K, V
    cp−1 hops forward, again backward with dK, dV cp hops (`analysis.ring_sends`)."""
    mesh = "data=2,context=4"
    tr, colls, _, _ = compiled(mesh)
    sends = [c for c in colls if c.op == "collective-permute"]
    assert sends and all(c.axes == ("context",) for c in sends)
    assert {analysis.attribute(c) for c in sends} == {"attention ring"}
    rows = analysis.ring_sends(TEST_MODEL, dict(tr.mesh.shape), BATCH, SEQ)
    assert sum(c.total_bytes for c in sends) == sum(r.total_bytes for r in rows)
    assert sum(c.count for c in sends) == sum(r.count for r in rows)
