"""Data x tensor parallelism (Megatron TP, optional sequence parallelism) equals one device."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.helpers import TEST_MODEL, assert_matches_reference, batch, loss_and_grads, trainer

MESHES = ["data=1,tensor=8", "data=2,tensor=4", "data=4,tensor=2", "data=8,tensor=1"]
STYLES = {
    "llama": TEST_MODEL,
    "gpt2-tied": dataclasses.replace(TEST_MODEL, style="gpt2", tie_embeddings=True),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("mesh", MESHES)
def test_loss_and_every_gradient_match_single_device(mesh, sequence_parallel, style):
    cfg = STYLES[style]
    loss, grads = loss_and_grads(cfg, mesh, sequence_parallel)
    assert_matches_reference(cfg, loss, grads)


def test_fsdp_matches_single_device():
    loss, grads = loss_and_grads(TEST_MODEL, "data=2,fsdp=2,tensor=2")
    assert_matches_reference(TEST_MODEL, loss, grads)


def test_init_is_sharded_and_identical_on_every_mesh():
    single = trainer(TEST_MODEL, "single").init(seed=0)[0]
    tr = trainer(TEST_MODEL, "data=2,tensor=4")
    params, opt_state = tr.init(seed=0)
    wqkv = params["blocks"]["attn"]["wqkv"][...]
    assert wqkv.sharding.spec[2] == "tensor"  # kv groups split over `tensor`
    c = TEST_MODEL  # never a full copy: each device holds n_kv_heads / t of the groups
    group = c.n_heads // c.n_kv_heads + 2
    assert wqkv.addressable_shards[0].data.shape == (
        c.n_layers, c.d_model, c.n_kv_heads // 4, group, c.head_dim)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Adam moments live exactly where their parameters live.
    for p, s in zip(jax.tree.leaves(tr.param_shardings), jax.tree.leaves(tr.opt_shardings[1][0].mu),
                    strict=True):
        assert p == s


def test_step_updates_params_and_keeps_shardings():
    tr = trainer(TEST_MODEL, "data=2,tensor=4", steps=4, warmup_steps=1)
    params, opt_state = tr.init(seed=0)
    before = np.asarray(params["head"]["w"][...])
    shardings = jax.tree.map(lambda a: a.sharding, params)
    params, opt_state, metrics = tr.step(params, opt_state, *tr.place(batch()))
    params, opt_state, metrics = tr.step(params, opt_state, *tr.place(batch()))
    assert not np.allclose(np.asarray(params["head"]["w"][...]), before)
    assert int(jax.tree.leaves(opt_state)[0]) == 2  # two updates counted
    assert jax.tree.map(lambda a: a.sharding, params) == shardings
    assert np.isfinite(float(metrics["loss"])) and float(metrics["lr"]) > 0
