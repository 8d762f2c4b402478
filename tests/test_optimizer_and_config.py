"""What the optimizer decays, and the model each style builds by default."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import TEST_MODEL, trainer
from tppjax.models import build_config

# Weights (projections and embedding tables) decay; norm gains and biases do not.
DECAYED = {
    "llama": {"embedding", "blocks/attn/wqkv", "blocks/attn/wo", "blocks/mlp/w_in",
              "blocks/mlp/w_down", "head/w"},
    "gpt2": {"embedding", "positions", "blocks/attn/wqkv", "blocks/attn/wo", "blocks/mlp/w_in",
             "blocks/mlp/w_down"},  # tied: no head/w
}


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_weight_decay_skips_norm_gains_and_biases(style):
    """One AdamW step on zero gradients moves a parameter only through weight decay: the
    weights shrink by lr·wd·w exactly, every gain and bias (stacked (L, ...) ones included)
    stays bit-identical. Every leaf first gets random values in [0.5, 1.5): at init biases are
    0 and gains 1, so decaying a bias would move nothing and go unseen."""
    cfg = dataclasses.replace(TEST_MODEL, style=style, tie_embeddings=style == "gpt2")
    tr = trainer(cfg, "single", warmup_steps=0, learning_rate=1e-2, weight_decay=0.1)
    params, opt_state = tr.init(seed=0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tr.tx.update)(zeros, opt_state, params)
    lr_wd = 1e-2 * 0.1
    decayed, kept = set(), set()
    for (path, w), u in zip(nnx.to_flat_state(params), jax.tree.leaves(updates), strict=True):
        name, w, u = "/".join(map(str, path)), np.asarray(w[...]), np.asarray(u)
        if np.any(u):
            np.testing.assert_allclose(u, -lr_wd * w, rtol=1e-6, err_msg=name)
            decayed.add(name)
        else:
            kept.add(name)
    assert decayed == DECAYED[style]
    assert kept and all(n.endswith(("scale", "bias")) or "/b" in n for n in kept), kept
    if style == "gpt2":  # the stacked (L, D) gains and (L, ...) biases are among the kept
        assert {"blocks/attn_norm/scale", "blocks/attn/bqkv", "blocks/mlp/b_in"} <= kept


def test_gpt2_style_defaults_are_gpt2s_own():
    """GPT-2 is multi-head, has a 4·d MLP and ties the head to the embedding, unless set."""
    cfg = build_config("small", style="gpt2")
    assert (cfg.n_kv_heads, cfg.d_ff, cfg.tie_embeddings) == (cfg.n_heads, 4 * cfg.d_model, True)
    cfg = build_config("tiny", style="gpt2", d_model=64, n_heads=8)
    assert (cfg.n_kv_heads, cfg.d_ff) == (8, 256)  # derived from the overridden sizes
    set_by_user = build_config("small", style="gpt2", n_kv_heads=4, d_ff=100,
                               tie_embeddings=False)
    assert (set_by_user.n_kv_heads, set_by_user.d_ff, set_by_user.tie_embeddings) == (4, 100,
                                                                                     False)
    llama = build_config("small")
    assert (llama.n_kv_heads, llama.d_ff, llama.tie_embeddings) == (8, 384, False)
