"""The single-device model against an independent plain-jnp reference (`tests/reference.py`).

Every parallel layout is checked against the same model on one device; this checks that model
against the published Llama and GPT-2 conventions, in float32, logits, loss and every gradient.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tests.helpers import RTOL, TEST_MODEL, batch, rel_err
from tppjax.models import Transformer, cross_entropy

CONFIGS = {
    # Grouped-query (16 heads, 8 kv heads), untied head; vocab 250 is padded to 256.
    "llama": TEST_MODEL,
    # Multi-head, tied head, GELU MLP of 4·d, biases.
    "gpt2": dataclasses.replace(
        TEST_MODEL, style="gpt2", n_kv_heads=TEST_MODEL.n_heads, d_ff=4 * TEST_MODEL.d_model,
        tie_embeddings=True,
    ),
}
SHAPE = (2, 8)


@functools.cache
def results(style: str) -> dict:
    """Model and reference on the same parameters and batch, compiled as one program: logits over
    the real vocabulary, loss and gradients (in the model's pure-dict layout) from each side."""
    cfg = CONFIGS[style]
    inputs, targets = map(jnp.asarray, batch(cfg, shape=SHAPE))
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    # Random values for every leaf, not the init: norm scales off 1 and biases off 0, so that each
    # one visibly shapes the logits. numpy, not jax.random, spares compiling the generator.
    rng = np.random.default_rng(0)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: (path[-1].key == "scale") + 0.05 * rng.standard_normal(x.shape, np.float32),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, pure)

    def model_loss(state):
        logits = nnx.merge(graphdef, state)(inputs)
        return cross_entropy(logits, targets), logits[..., : cfg.vocab_size]

    @jax.jit
    def run(state, pure):
        (m_loss, m_logits), m_grads = jax.value_and_grad(model_loss, has_aux=True)(state)
        r_loss, r_grads = jax.value_and_grad(reference.loss, argnums=1)(cfg, pure, inputs, targets)
        r_logits = reference.forward(cfg, reference.plain_params(cfg, pure), inputs)
        return (m_loss, m_logits, nnx.to_pure_dict(m_grads)), (r_loss, r_logits, r_grads)

    model, ref = jax.device_get(run(state, pure))
    return {"model": model, "reference": ref, "params": pure, "inputs": inputs}


@pytest.mark.parametrize("style", CONFIGS)
def test_logits_match(style):
    # Measured: llama 3.6e-7, gpt2 3.7e-7 (logits' rms ≈ 0.4).
    res = results(style)
    (_, m_logits, _), (_, r_logits, _) = res["model"], res["reference"]
    assert m_logits.shape == r_logits.shape == (*SHAPE, CONFIGS[style].vocab_size)
    err = rel_err(m_logits, r_logits)
    assert err <= RTOL, f"{style} logits: relative error {err:.2e} > {RTOL}"


@pytest.mark.parametrize("style", CONFIGS)
def test_loss_and_every_gradient_match(style):
    # Measured: loss equal to the last bit; worst leaf llama 6.4e-7 (mlp_norm scale), gpt2 5.7e-7
    # (bqkv).
    res = results(style)
    (m_loss, _, m_grads), (r_loss, _, r_grads) = res["model"], res["reference"]
    assert rel_err(m_loss, r_loss) <= RTOL, f"{style} loss {m_loss} vs reference {r_loss}"
    # Same floor as `assert_matches_reference`: a leaf whose exact gradient is zero holds only
    # rounding noise, so its error is relative to at least 1e-3 of the whole gradient's norm.
    # (gpt2's key bias, exactly zero, is a slice of the `bqkv` leaf, so here it never decides.)
    floor = 1e-3 * float(np.sqrt(sum(np.sum(np.square(r)) for r in jax.tree.leaves(r_grads))))
    m_paths, r_paths = (jax.tree_util.tree_leaves_with_path(g) for g in (m_grads, r_grads))
    errs = {}
    for (path, g), (r_path, r) in zip(m_paths, r_paths, strict=True):
        assert path == r_path and g.shape == r.shape, (path, r_path)
        errs[jax.tree_util.keystr(path)] = rel_err(g, r, floor)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= RTOL, f"{style} gradient {worst}: relative error {errs[worst]:.2e}"


@pytest.mark.parametrize("bug", ["interleaved_rope", "tile_kv"])
def test_comparison_notices_a_wrong_convention(bug):
    """Interleaved-pair RoPE or GQA by tiling kv heads (head j reads j % K, not j // G) must
    move the logits far past the tolerance, or the passing comparison above proves nothing."""
    cfg = CONFIGS["llama"]
    res = results("llama")
    pp = reference.plain_params(cfg, res["params"])
    wrong = jax.jit(functools.partial(reference.forward, cfg, **{bug: True}))(pp, res["inputs"])
    err = rel_err(wrong, res["model"][1])
    # Measured: interleaved_rope 9.0e-2, tile_kv 1.4.
    assert err > 1000 * RTOL, f"{bug}: logits moved only {err:.2e}"


@pytest.mark.parametrize("mesh", ["single", "tensor=8"])
def test_loss_is_stable_for_large_logits(mesh):
    """Logits near 300 (exp overflows float32 past 88.7): the loss and its gradient stay finite
    and equal a float64 numpy log-sum-exp, on one device and with the vocabulary split over 8
    devices (Megatron's vocab-parallel loss: each shard's max, then the all-reduced one)."""
    b, t, v = 2, 8, 256
    rng = np.random.default_rng(0)
    logits = (300.0 + 10.0 * rng.standard_normal((b, t, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    assert logits.min() > 89.0
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    p = np.exp(z - m)
    p /= p.sum(-1, keepdims=True)
    log_z = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    want_loss = np.mean(log_z - np.take_along_axis(z, targets[..., None], -1)[..., 0])
    want_grad = (p - np.eye(v)[targets]) / (b * t)
    x = jnp.asarray(logits)
    if mesh != "single":
        spec = jax.sharding.PartitionSpec(None, None, "tensor")
        x = jax.device_put(x, jax.sharding.NamedSharding(jax.make_mesh((8,), ("tensor",)), spec))
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy))(x, jnp.asarray(targets))
    if mesh != "single":
        assert len(grad.sharding.device_set) == 8
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    assert rel_err(loss, want_loss) <= RTOL, f"loss {float(loss)} vs {want_loss}"
    err = rel_err(grad, want_grad)
    assert err <= RTOL, f"gradient: relative error {err:.2e}"
