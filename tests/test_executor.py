"""The table-driven executor runs every schedule, equals one device, and 1F1B's memory is flat."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from flax.core import spmd as flax_spmd
from jax._src import debugging

from tests.helpers import TEST_MODEL, assert_matches_reference, batch, loss_and_grads, trainer
from tppjax.models import transformer
from tppjax.pipeline.actions import StageActions
from tppjax.pipeline.executor import pipelined_loss
from tppjax.pipeline.gpipe import gpipe, to_microbatches, to_stages
from tppjax.pipeline.schedules import chunks_needed, make_schedule
from tppjax.pipeline.table import plan
from tppjax.spmd.pipelined import head_parts

PIPE_MODEL = dataclasses.replace(TEST_MODEL, n_layers=8)
# GPT-2 as GPT-2 is: multi-head, MLP 4·d, biases, learned positions, head tied to the embedding
# (whose gradient then gathers the embedding's and the head's parts, across stages).
GPT2_MODEL = dataclasses.replace(PIPE_MODEL, style="gpt2", n_kv_heads=16, d_ff=256,
                                 tie_embeddings=True)
MODELS = {"llama": PIPE_MODEL, "gpt2": GPT2_MODEL}
SHAPE = (24, 8)  # per-data-shard batch 24 or 12: divisible by every m used here


def mesh_of(d, p, t):
    return f"data={d},stage={p},tensor={t}"


# 1F1B on every mesh with m = p and 3p: the sweep below.
CASES = [
    ("1f1b", (2, 2, 2), 4, 1, "none", False, "llama"),
    ("gpipe", (2, 2, 2), 4, 1, "none", False, "llama"),
    ("autodiff-gpipe", (2, 2, 2), 4, 1, "none", False, "llama"),  # the readable reference
    ("zb-h1", (1, 4, 2), 4, 1, "none", False, "llama"),
    ("zb-h1", (2, 2, 2), 4, 1, "layer", True, "llama"),
    ("interleaved", (1, 2, 4), 4, 2, "none", False, "llama"),
    ("interleaved", (2, 2, 2), 2, 2, "stage", True, "llama"),
    ("zb-v", (1, 4, 2), 4, 2, "none", False, "llama"),  # V placement: sends both ways
    ("zb-v", (2, 2, 2), 4, 2, "layer", True, "gpt2"),
    ("1f1b", (1, 4, 2), 3, 1, "layer", False, "llama"),  # m = 3: not a multiple of p
    ("1f1b", (2, 2, 2), 4, 1, "stage", True, "llama"),
    # Every schedule with the gpt2 style and tied embeddings.
    ("autodiff-gpipe", (1, 2, 4), 2, 1, "none", False, "gpt2"),
    ("1f1b", (2, 2, 2), 4, 1, "none", True, "gpt2"),
    ("zb-h1", (1, 4, 2), 4, 1, "layer", False, "gpt2"),
    ("interleaved", (2, 2, 2), 2, 2, "none", False, "gpt2"),
    # zb-h2: m = 8 = 2p on p = 4 (24 rows per shard), past the 2p-1 = 7 warm-up on stage 0.
    ("zb-h2", (1, 4, 2), 8, 1, "none", False, "llama"),
    ("zb-h2", (2, 2, 2), 4, 1, "layer", False, "llama"),
    # dualpipe-v: F beside another micro-batch's full backward in one tick (shared slots).
    ("dualpipe-v", (1, 4, 2), 8, 2, "none", False, "llama"),
    ("dualpipe-v", (2, 2, 2), 4, 2, "layer", True, "gpt2"),
]


@pytest.mark.parametrize(
    "schedule,dpt,m,v,remat,sp,style", CASES,
    ids=[f"{c[0]}-{mesh_of(*c[1])}-m{c[2]}-v{c[3]}-{c[4]}{'-sp' if c[5] else ''}-{c[6]}"
         for c in CASES])
def test_every_schedule_matches_single_device(schedule, dpt, m, v, remat, sp, style):
    cfg = MODELS[style]
    if schedule == "autodiff-gpipe":
        loss, grads = autodiff_gpipe_loss_and_grads(cfg, dpt, m)
    else:
        loss, grads = loss_and_grads(cfg, mesh_of(*dpt), sp, shape=SHAPE, microbatches=m,
                                     schedule=schedule, virtual_stages=v, remat=remat)
    assert_matches_reference(cfg, loss, grads, shape=SHAPE)


def autodiff_gpipe_loss_and_grads(cfg, dpt, m):
    """`--schedule gpipe` trains through the executor; `jax.grad` of the forward tick loop
    (`pipeline.gpipe`, what evaluation runs) is GPipe too, and is held to one device here."""
    tr, params = mesh_trainer(dpt, SHAPE, cfg)

    def loss(params, inputs, targets):
        with flax_spmd.logical_axis_rules(tr.rules.activations):
            model = nnx.merge(tr.graphdef, params)
            block_def, stacked = nnx.split(model.blocks)
            hp, head_fn = head_parts(model)
            ys = gpipe(block_def, to_stages(stacked, tr.stages), to_microbatches(
                model.embed(inputs), m))
            return head_fn(hp, ys.reshape(-1, *ys.shape[2:]),
                           to_microbatches(targets, m).reshape(-1, SHAPE[1]))

    inputs, targets = tr.place(batch(cfg, shape=SHAPE))
    with jax.set_mesh(tr.mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params, inputs, targets)
    return float(value), jax.device_get(grads)


@pytest.mark.parametrize("remat,expect", [("none", 1), ("stage", 2)])
def test_each_stage_forward_runs_once_per_microbatch(monkeypatch, remat, expect):
    """With remat none, F keeps the residuals and B (and W) reuse them: every schedule runs each
    micro-batch's stage forward exactly once per stage; with remat stage, B runs it again.
    Counted at run time: every block call reports its stage to a callback (p=2, m=4). Uneven
    stages (3 + 1 layers): padding slots run no block."""
    counts = collections.Counter()
    block_call = transformer.Block.__call__

    def counted(self, x, *args):  # x[0, 0, 0] ties the callback to this call's data
        jax.debug.callback(lambda s, _: counts.update([int(s)]), jax.lax.axis_index("stage"),
                           x[0, 0, 0])
        return block_call(self, x, *args)

    monkeypatch.setattr(transformer.Block, "__call__", counted)
    # jax 0.10.2 lowers a callback inside a partly manual shard_map by `axis_index(*auto)`,
    # which takes one axis name; this mesh has two automatic axes (tensor, context; size 1).
    # (raising=False: a jax without that private function lowers such callbacks itself.)
    monkeypatch.setattr(debugging, "_debug_callback_partial_auto", _callback_on_first_device,
                        raising=False)
    cfg, m = dataclasses.replace(TEST_MODEL, n_layers=4), 4  # 2 blocks per stage
    for schedule, layers in (("1f1b", None), ("zb-h1", (3, 1)), ("interleaved", None),
                             ("dualpipe-v", None)):
        counts.clear()
        tr = trainer(cfg, "stage=2,data=4", shape=(16, 8), microbatches=m, schedule=schedule,
                     virtual_stages=chunks_needed(schedule), remat=remat, stage_layers=layers)
        jax.block_until_ready(tr.loss_and_grads(tr.init(seed=0)[0],
                                                *tr.place(batch(cfg, shape=(16, 8)))))
        jax.effects_barrier()  # every callback has run
        # Each of the 4 data shards calls it too, once per real layer of the stage.
        per_stage = (3, 1) if layers else (2, 2)
        runs = {s: n / (4 * per_stage[s]) for s, n in counts.items()}
        assert runs == {0: expect * m, 1: expect * m}, (schedule, runs)
        if remat == "stage":
            break  # recomputation is one mechanism for every schedule; one is enough


def _callback_on_first_device(axis_context, *args, **params):
    """The callback once per group of the automatic axes, on its first device."""
    auto = tuple(sorted(set(axis_context.mesh.axis_names) - axis_context.manual_axes))

    def first():
        return jax.lax.cond(jax.lax.axis_index(auto) == 0,
                            lambda: debugging.debug_callback_p.bind(*args, **params), lambda: [])

    return jax.shard_map(first, in_specs=(), out_specs=[])()


def test_buffers_do_not_grow_with_microbatches():
    """Every buffer (stage inputs, output gradients, F's stash, what B keeps for W) holds at most p
    micro-batches under 1f1b and zb-h1, whatever m; GPipe's table keeps all m residuals."""
    for m in (4, 16, 64):
        for name in ("1f1b", "zb-h1"):
            assert max(plan(name, 4, m).slots.values()) <= 4, (name, m, plan(name, 4, m).slots)
    assert plan("gpipe", 4, 16).slots["stash"] == 16


@functools.cache
def mesh_trainer(dpt, shape, cfg=PIPE_MODEL):
    tr = trainer(cfg, mesh_of(*dpt), shape=shape, microbatches=1)
    return tr, tr.init(seed=0)[0]


def temp_bytes(kind, m, dpt=(1, 4, 2), b_mb=4, seq=64, remat="none"):
    """Temp bytes of the compiled gradient of blocks + head on given embeddings xs (xs is an
    argument and the gradients are outputs, so only the loop's working memory is counted).
    kind: an executor schedule, or "autodiff-gpipe" (pipeline.gpipe under jax.grad)."""
    tr, params = mesh_trainer(dpt, (b_mb, seq))
    model = nnx.merge(tr.graphdef, params)
    block_def, stacked = nnx.split(model.blocks)
    hp, head_fn = head_parts(model)
    xs = jnp.zeros((m, b_mb, seq, PIPE_MODEL.d_model), jnp.float32)
    tg = jnp.zeros((m, b_mb, seq), jnp.int32)

    def f(stacked, hp, xs, tg):
        with flax_spmd.logical_axis_rules(tr.rules.activations):
            if kind != "autodiff-gpipe":
                return pipelined_loss(block_def, stacked, xs, tg, head_fn, hp,
                                      make_schedule(kind, dpt[1], m), remat)
            ys = gpipe(block_def, to_stages(stacked, dpt[1]), xs)
            return head_fn(hp, ys.reshape(-1, *ys.shape[2:]), tg.reshape(-1, seq))

    with jax.set_mesh(tr.mesh):
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(
            stacked, hp, xs, tg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def w_keeps(dpt=(1, 4, 2), b_mb=4, seq=64, m=4):
    """Upper bound on what zb-h1 keeps for its deferred W's on one stage: every weight product's
    input and output gradient (B → W) in every slot of the buffer that holds them, and the
    inputs also in every stash slot (F → B: B hands them on). Unsharded bytes, so at least what
    one device holds."""
    tr, params = mesh_trainer(dpt, (b_mb, seq))
    block_def, stacked = nnx.split(nnx.merge(tr.graphdef, params).blocks)
    act = StageActions(block_def, "none", split=True)

    def kept(w, x):
        _, stash = act.forward(w, x)
        return act.backward(w, stash, x)[2]

    w = jax.tree.map(lambda a: a[: PIPE_MODEL.n_layers // dpt[1]], stacked)
    x = jax.ShapeDtypeStruct((b_mb, seq, PIPE_MODEL.d_model), jnp.float32)
    kept = jax.eval_shape(kept, w, x)
    inputs, both = (sum(a.size * a.dtype.itemsize for a in part) for part in (kept[::2], kept))
    slots = plan("zb-h1", dpt[1], m).slots
    return slots["stash"] * inputs + slots["kept"] * both


def test_1f1b_memory_flat_in_microbatches_gpipe_grows():
    """remat none (every residual kept): 1F1B's working memory does not grow with m, GPipe's
    does, and ZB-H1 needs at most 1F1B's plus what its deferred W's keep."""
    temp = {(k, m): temp_bytes(k, m) for k in ("1f1b", "autodiff-gpipe") for m in (4, 16)}
    assert temp[("1f1b", 16)] <= 1.1 * temp[("1f1b", 4)], temp
    assert temp[("autodiff-gpipe", 16)] > 2 * temp[("autodiff-gpipe", 4)], temp
    assert temp[("1f1b", 4)] < temp_bytes("zb-h1", 4) <= temp[("1f1b", 4)] + w_keeps(), temp


SWEEP_MODEL = dataclasses.replace(TEST_MODEL, n_layers=16)  # divisible by p·v = 8·2
SWEEP_SHAPE = (48, 8)  # every data shard's batch divisible by every m = p, 3p below
MESHES = {"data=1,stage=2,tensor=4": ((1, 2, 4), 3), "data=2,stage=2,tensor=2": ((2, 2, 2), 1),
          "data=1,stage=4,tensor=2": ((1, 4, 2), 3), "data=1,stage=8,tensor=1": ((1, 8, 1), 1)}
# 1F1B on every mesh; every other schedule on the meshes its cases above do not cover, so each
# schedule meets at least two meshes and each mesh at least three schedules.
SWEEP = [(schedule, MESHES[mesh][0], MESHES[mesh][1] * MESHES[mesh][0][1])
         for schedule, meshes in (
             ("1f1b", list(MESHES)),
             ("gpipe", ["data=1,stage=2,tensor=4", "data=1,stage=8,tensor=1"]),
             ("zb-h1", ["data=1,stage=2,tensor=4", "data=1,stage=8,tensor=1"]),
             ("interleaved", ["data=1,stage=4,tensor=2", "data=2,stage=2,tensor=2"]),
             ("zb-h2", ["data=1,stage=8,tensor=1"]),
             ("zb-v", ["data=1,stage=2,tensor=4"]))
         for mesh in meshes]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,dpt,m", SWEEP,
                         ids=[f"{s}-{mesh_of(*d)}-m{m}" for s, d, m in SWEEP])
def test_schedule_sweep_matches_single_device(schedule, dpt, m):
    """Schedules x meshes, m = p or 3p (m = 2p: the cases above), held to the single-device
    model."""
    loss, grads = loss_and_grads(SWEEP_MODEL, mesh_of(*dpt), shape=SWEEP_SHAPE, microbatches=m,
                                 schedule=schedule, virtual_stages=chunks_needed(schedule))
    assert_matches_reference(SWEEP_MODEL, loss, grads, shape=SWEEP_SHAPE)
