"""Pipeline parallelism (GPipe over `stage`, composed with data and tensor) equals one device."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.helpers import TEST_MODEL, assert_matches_reference, batch, loss_and_grads, trainer
from tppjax.measure import census
from tppjax.pipeline.gpipe import from_stages, to_stages

PIPE_MODEL = dataclasses.replace(TEST_MODEL, n_layers=8)
SHAPE = (40, 8)  # per-data-shard batch 40 or 20: divisible by m in {1, p} and by 2p+1 = 5


def mesh_of(d, p, t):
    return f"data={d},stage={p},tensor={t}"


# (data, stage, tensor), m in {1, p, 2p+1 where it divides the data shard's batch}. GPipe runs
# through the executor like every schedule (tests/test_executor.py sweeps them all); these
# cases cover what is GPipe's own: m = 1, m not a multiple of p, every stage count.
CASES = [((1, 2, 4), 1), ((2, 2, 2), 5), ((1, 4, 2), 4), ((2, 4, 1), 1), ((1, 8, 1), 8)]


@pytest.mark.parametrize("dpt,m", CASES, ids=[f"{mesh_of(*c)}-m{m}" for c, m in CASES])
def test_gpipe_matches_single_device(dpt, m):
    loss, grads = loss_and_grads(PIPE_MODEL, mesh_of(*dpt), shape=SHAPE, microbatches=m)
    assert_matches_reference(PIPE_MODEL, loss, grads, shape=SHAPE)


@pytest.mark.parametrize("dpt,m,sp,remat", [
    ((2, 2, 2), 2, True, "none"),
    ((1, 4, 2), 4, True, "layer"),
    ((2, 2, 2), 5, False, "stage"),
    ((1, 2, 4), 2, False, "layer"),
])
def test_gpipe_with_sequence_parallelism_and_remat(dpt, m, sp, remat):
    loss, grads = loss_and_grads(PIPE_MODEL, mesh_of(*dpt), sp, shape=SHAPE, microbatches=m,
                                 remat=remat)
    assert_matches_reference(PIPE_MODEL, loss, grads, shape=SHAPE)


def test_gpipe_gpt2_with_tied_embeddings():
    """GPT-2 as GPT-2 is (multi-head, MLP 4·d, biases, learned positions, tied head): the tied
    embedding's gradient sums its lookup part (before the loop) and its head part (after)."""
    cfg = dataclasses.replace(PIPE_MODEL, style="gpt2", n_kv_heads=16, d_ff=256,
                              tie_embeddings=True)
    shape = (24, 8)  # test_executor's: its gpt2 cases share this single-device reference
    loss, grads = loss_and_grads(cfg, mesh_of(2, 2, 2), True, shape=shape, microbatches=4)
    assert_matches_reference(cfg, loss, grads, shape=shape)


def test_stage_partition_is_exactly_invertible_and_local():
    tr = trainer(PIPE_MODEL, mesh_of(1, 4, 2), shape=SHAPE, microbatches=4)
    params, _ = tr.init(seed=0)
    blocks = params["blocks"]
    staged = to_stages(blocks, 4)
    wqkv = staged["attn"]["wqkv"][...]
    assert wqkv.shape[:2] == (4, 2)
    # Stage s holds layers 2s, 2s+1 and nothing else.
    for shard in wqkv.addressable_shards:
        assert shard.data.shape[:2] == (1, 2)
    for a, b in zip(jax.tree.leaves(from_stages(staged)), jax.tree.leaves(blocks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def lowered_step(dpt, m, shape=SHAPE, **kw):
    tr = trainer(PIPE_MODEL, mesh_of(*dpt), shape=shape, microbatches=m, **kw)
    params, opt_state = tr.init(seed=0)
    return tr, tr.lower_step(params, opt_state, *tr.place(batch(PIPE_MODEL, shape=shape)))


def test_one_activation_sized_send_per_tick_that_has_a_receiver():
    """GPipe's m + p − 1 forward ticks, then as many backward ones: activations go forward on
    the first m + p − 2 (the last stage's last F sends nothing), gradients back on the last
    m + p − 2; the executor skips a `ppermute` that no stage would receive."""
    (d, p, t), m = (1, 4, 2), 4
    tr, lowered = lowered_step((d, p, t), m)
    sends = [c for c in census.collectives(lowered.compile().as_text(), tr.mesh, "gpipe", m)
             if c.op == "collective-permute"]
    x_mb = SHAPE[0] // d // m * SHAPE[1] * PIPE_MODEL.d_model * 4  # b_mb·s·h float32
    assert sorted((c.phase, c.bytes, c.axes, c.counts) for c in sends) == [
        (phase, x_mb, ("stage",), (m + p - 2,) * p) for phase in "BF"], sends


def test_compile_size_does_not_grow_with_microbatches():
    sizes = {}
    for m in (4, 32):
        _, lowered = lowered_step((1, 4, 2), m, shape=(64, 8))
        sizes[m] = len(lowered.compile().as_text())
    assert abs(sizes[32] - sizes[4]) <= 0.2 * sizes[4], sizes
