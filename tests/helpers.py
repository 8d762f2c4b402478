"""Shared test fixtures: a tiny model, a fixed batch, the single-device reference, error norms."""

import dataclasses
import functools

import jax
import numpy as np

from models import PRESETS, ModelConfig
from spmd.mesh import make_mesh
from spmd.rules import Rules
from spmd.train_step import TrainConfig, Trainer

# Divisible by every tensor size up to 8 (16 heads, 8 kv-heads: grouped-query, 2 per group);
# vocab 250 is NOT a multiple of 8: it is padded to 256 and the pad logits are masked.
TEST_MODEL = dataclasses.replace(
    PRESETS["tiny"], d_model=64, n_heads=16, n_kv_heads=8, d_ff=128, vocab_size=250, n_layers=2
)
BATCH, SEQ = 8, 16
# float32, relative to the leaf's norm. Sums are re-associated across shards, so results differ
# from one device by a few float32 ulps (measured worst ≈ 5e-7); 1e-5 leaves 20x headroom.
RTOL = 1e-5


def batch(cfg: ModelConfig = TEST_MODEL, seed: int = 0, shape: tuple[int, int] = (BATCH, SEQ)):
    b, s = shape
    tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, s + 1), np.int32)
    return tok[:, :-1], tok[:, 1:]


def trainer(cfg, mesh_spec: str, sequence_parallel=False, shape=(BATCH, SEQ), **train_kw):
    devices = jax.devices()[:1] if mesh_spec == "single" else None
    mesh = make_mesh("data=1" if mesh_spec == "single" else mesh_spec, devices)
    return Trainer(cfg, TrainConfig(**train_kw), mesh, Rules(sequence_parallel), shape)


def loss_and_grads(cfg, mesh_spec, sequence_parallel=False, shape=(BATCH, SEQ), **train_kw):
    tr = trainer(cfg, mesh_spec, sequence_parallel, shape, **train_kw)
    params, _ = tr.init(seed=0)
    loss, grads = tr.loss_and_grads(params, *tr.place(batch(cfg, shape=shape)))
    return float(loss), jax.device_get(grads)


@functools.cache
def reference(cfg: ModelConfig, shape: tuple[int, int] = (BATCH, SEQ)):
    """The single-device model: loss and gradients on the same data and init."""
    return loss_and_grads(cfg, "single", shape=shape)


def rel_err(a, b, floor: float = 1e-30) -> float:
    """‖a − b‖ / max(‖b‖, floor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def assert_matches_reference(cfg, loss, grads, rtol=RTOL, shape=(BATCH, SEQ)):
    ref_loss, ref_grads = reference(cfg, shape)
    assert rel_err(loss, ref_loss) <= rtol, f"loss {loss} vs single-device {ref_loss}"
    # A leaf whose exact gradient is zero (the key bias: softmax ignores a shift shared by all
    # keys) holds only rounding noise, so each leaf's error is taken relative to at least 1e-3
    # of the whole gradient's norm.
    floor = 1e-3 * float(np.sqrt(sum(np.sum(np.square(r)) for r in jax.tree.leaves(ref_grads))))
    errs = {
        "/".join(map(str, path)): rel_err(g, r, floor)
        for (path, g), (_, r) in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads),
            strict=True,
        )
    }
    worst = max(errs, key=errs.get)
    assert errs[worst] <= rtol, f"gradient {worst}: relative error {errs[worst]:.2e} > {rtol}"
    return max(errs.values())
