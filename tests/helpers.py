"""Shared test fixtures: a tiny model, a fixed batch, the single-device reference, error norms,
and compiled steps with their collectives (shared by the census and collective tests)."""

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tppjax.measure import analysis
from tppjax.measure.hlo import collectives
from tppjax.models import PRESETS, ModelConfig
from tppjax.spmd.loop import parameter_table
from tppjax.spmd.mesh import make_mesh
from tppjax.spmd.rules import Rules
from tppjax.spmd.train_step import TrainConfig, Trainer

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


def replicating(tr, path: str):
    """Make `tr`'s loss constrain parameter `path` to replicated before use, so the step must
    all-gather that weight: what `analysis.weight_gathers` has to catch."""
    rep = NamedSharding(tr.mesh, P())

    def target(keys, sharding):
        return rep if "/".join(k.key for k in keys if hasattr(k, "key")) == path else sharding

    shardings = jax.tree_util.tree_map_with_path(target, tr.param_shardings)
    loss = tr.loss
    tr.loss = lambda params, *a, **kw: loss(
        jax.lax.with_sharding_constraint(params, shardings), *a, **kw)
    return tr


def compiled(mesh_spec, sequence_parallel=False, gather=None, cfg=TEST_MODEL, **kw):
    """(trainer, collectives, parameter table, HLO text) of the compiled step; with `gather` (a
    parameter path) the step first replicates that parameter. Cached however it is called
    (positional or keyword): the census and collective tests share these programs."""
    return _compiled(mesh_spec, sequence_parallel, gather, cfg, tuple(sorted(kw.items())))


@functools.cache
def _compiled(mesh_spec, sequence_parallel, gather, cfg, kw):
    tr = trainer(cfg, mesh_spec, sequence_parallel, **dict(kw))
    if gather:
        replicating(tr, gather)
    params, opt_state = tr.init(seed=0)
    text = tr.lower_step(params, opt_state, *tr.place(batch(cfg))).compile().as_text()
    return tr, collectives(text, tr.mesh), parameter_table(tr, params), text


def weight_gathers(mesh_spec, sequence_parallel=False, gather=None, **kw) -> list[tuple]:
    """(op, axes, parameters it fits) of every collective that moves a weight."""
    _, colls, table, _ = compiled(mesh_spec, sequence_parallel, gather, **kw)
    return [(c.op, c.axes, tuple(names)) for c, names in analysis.weight_gathers(colls, table)]
