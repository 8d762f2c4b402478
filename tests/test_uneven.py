"""Uneven pipeline stages (`pipeline.layout`): layers that do not divide by the stages train in
parity with one device, padding slots stay exactly zero, and checkpoints hold the unpadded
layers, so they restore onto an even mesh, one device, or another uneven split."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import TEST_MODEL, assert_matches_reference, batch, trainer
from tppjax.errors import ConfigError
from tppjax.models import Transformer
from tppjax.pipeline.actions import StageActions
from tppjax.pipeline.layout import StageLayout, balance, parse_stage_layers
from tppjax.spmd.checkpoint import CheckpointManager, run_info
from tppjax.spmd.pipelined import stage_layout
from tppjax.spmd.train_step import TrainConfig

CFG6 = dataclasses.replace(TEST_MODEL, n_layers=6)
CFG5 = dataclasses.replace(TEST_MODEL, n_layers=5)
CASES = {  # (model, mesh, train settings)
    # auto-balanced 1,2,2,1; split backward (W skips padding too), layer remat
    "zb-h1": (CFG6, "stage=4,tensor=2", dict(schedule="zb-h1", microbatches=4,
                                             remat="layer")),
    # V placement, given per virtual stage, one virtual stage with no layer at all
    "zb-v": (CFG5, "data=2,stage=2,tensor=2", dict(schedule="zb-v", virtual_stages=2,
                                                   microbatches=2, stage_layers=(2, 1, 0, 2))),
}


@functools.cache
def uneven(case):
    cfg, mesh, kw = CASES[case]
    return trainer(cfg, mesh, **kw)


@pytest.mark.parametrize("case", CASES)
def test_uneven_stages_match_one_device(case):
    tr = uneven(case)
    assert tr.padded
    params, _ = tr.init(seed=0)
    inputs, targets = tr.place(batch(tr.cfg))
    loss, grads = tr.loss_and_grads(params, inputs, targets)
    # Padding slots: zero weights (an exact identity) and exactly zero gradients, so AdamW
    # keeps them zero (its update of a zero gradient and a zero weight is zero).
    pads = ~tr.layout.active().reshape(-1)
    for state in (params, grads):
        for a in jax.tree.leaves(state["blocks"]):
            assert not np.asarray(a)[pads].any()
    (canonical,) = tr.to_canonical(grads)
    assert_matches_reference(tr.cfg, float(loss), jax.device_get(canonical))
    # Evaluation runs GPipe's forward over the padded stack: the same loss.
    assert float(tr.eval_loss(params, inputs, targets)) == pytest.approx(float(loss), rel=1e-6)


def test_checkpoint_of_uneven_stages_restores_anywhere(tmp_path, caplog):
    tr = uneven("zb-h1")
    params, opt_state = tr.init(seed=0)
    canonical = jax.device_get(tr.to_canonical(params, opt_state))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        again = tr.to_canonical(params, opt_state)  # as at every save: compiled once per run
    assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]
    with CheckpointManager.open(tmp_path, run_info(CFG6, TrainConfig(), "stage=4,tensor=2", 0)
                                ) as ckpt:
        ckpt.save(0, *again)
        ckpt.wait()
        for target in (trainer(CFG6, "stage=2,tensor=4"), trainer(CFG6, "single"),
                       trainer(CFG6, "stage=4,tensor=2", stage_layers=(2, 1, 1, 2)),
                       trainer(CFG6, "stage=2,tensor=4", stage_layers=(4, 2))):
            restored = ckpt.restore(0, target)[:2]
            assert target.padded == (target.stages > 1 and target.tc.stage_layers is not None)
            # Uneven: the canonical layers stay split over `stage` where it divides them (6 on
            # 2 stages), else they are whole (6 on 4).
            spec = jax.tree.leaves(target.canonical_shardings[0]["blocks"])[0].spec
            assert not target.padded or (spec[0] == "stage") == (target.stages == 2), spec
            back = jax.device_get(target.to_canonical(*restored))
            jax.tree.map(np.testing.assert_array_equal, back, canonical)
        restored = ckpt.restore(0, tr)[:2]  # and back onto the run's own layout, padded
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                     jax.device_get((params, opt_state)))


def test_layouts():
    """Balance by cost per device: the head weighs on the last virtual stage; ties go to the
    middle, so the ends get fewer layers. Even when the layers divide, unless asked."""
    assert balance(6, 4, 0.2) == (1, 2, 2, 1)
    assert balance(7, 4, 0.2) == (2, 2, 2, 1)
    assert balance(5, 2, 0.2) == (3, 2)
    assert balance(8, 4, 1.5) == (2, 3, 2, 1)  # a head as costly as 1.5 layers
    # V placement, p = 2: device 0 holds virtual stages 0 and 3, device 1 stages 1 and 2;
    # by device 2 + 1 + head against 2 + 1 (1, 2, 2, 1 would put 4 layers on device 1)
    assert balance(6, 4, 0.14, [0, 1, 1, 0]) == (2, 2, 1, 1)
    assert stage_layout(CFG6, 4, 1, 16).counts == (1, 2, 2, 1)
    assert stage_layout(CFG6, 2, 1, 16).counts == (3, 3)
    assert stage_layout(CFG6, 2, 1, 16, (4, 2)).counts == (4, 2)
    layout = StageLayout((1, 2, 0, 2))
    assert (layout.slots, list(layout.slot_of_layer())) == (8, [0, 2, 3, 6, 7])
    assert [list(r) for r in layout.ranges()] == [[0], [1, 2], [], [3, 4]]
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(layout.unpad(layout.pad(x)), x)
    assert parse_stage_layers("auto") == "auto" and parse_stage_layers("1,0,3") == (1, 0, 3)
    for bad in ("1,-1", "a,b", ""):
        with pytest.raises(ConfigError, match="--stage-layers"):
            parse_stage_layers(bad)
    with pytest.raises(ConfigError, match=r"must give 4 numbers .* sum to the 6 layers"):
        stage_layout(CFG6, 4, 1, 16, (1, 2, 2))
    assert stage_layout(CFG6, 4, 1, 16, [1, 2, 2, 1]).counts == (1, 2, 2, 1)  # a list, or
    assert stage_layout(CFG6, 4, 1, 16, "2,2,1,1").counts == (2, 2, 1, 1)  # the flag's text
    with pytest.raises(ConfigError, match="negative count"):
        stage_layout(CFG6, 2, 1, 16, (7, -1))
    with pytest.raises(ConfigError, match="needs pipeline stages"):
        trainer(CFG6, "data=2,tensor=4", stage_layers=(3, 3))


@pytest.mark.parametrize("remat", ["none", "layer"])
def test_padding_keeps_no_weights_in_the_stash(remat):
    """F of a padded stage runs each real slot's own vjp: its stash holds the same residuals
    as the unpadded stage, not a copy of the weights (a `lax.cond` inside one vjp kept its
    operands, the weights, per micro-batch). With remat none, loop invariants the unpadded scan
    keeps once (the causal mask, rotary tables) are kept per slot: at most 20% more here."""
    with nnx.use_eager_sharding(False):
        blocks = nnx.eval_shape(lambda: Transformer(CFG6, nnx.Rngs(0))).blocks
    block_def, stacked = nnx.split(blocks)
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((3, *a.shape[1:]), a.dtype), stacked)
    x = jax.ShapeDtypeStruct((2, 16, CFG6.d_model), jnp.float32)
    for split in (False, True):
        sizes = [sum(a.size for a in jax.tree.leaves(jax.eval_shape(
            lambda w, x: StageActions(block_def, remat, split).forward(w, x, active)[1],
            stacked, x))) for active in (None, jnp.array([True, True, False]))]
        assert sizes[0] <= sizes[1] <= 1.2 * sizes[0], (split, sizes)
