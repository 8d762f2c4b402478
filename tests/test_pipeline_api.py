"""`pipeline.executor.pipelined_loss` pipelines models that are not the Transformer: an MLP stack
whose weight products go through `tppjax.models.project` (so zero-bubble schedules split
their backward exactly) and a convolutional stack built from `nnx.Conv` (its kernels' gradients
are computed whole in B), with every schedule, against the same model run unpipelined."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests.helpers import RTOL, rel_err
from tppjax.errors import ConfigError
from tppjax.models import project
from tppjax.pipeline.executor import pipelined_loss
from tppjax.pipeline.gpipe import apply_layer
from tppjax.pipeline.schedules import SCHEDULES, chunks_needed, make_schedule
from tppjax.spmd.mesh import make_mesh

D, LAYERS, M, ROWS, T = 16, 4, 4, 4, 6  # width, layers, micro-batches, rows each, length


class MLPLayer(nnx.Module):
    """x + W2·gelu(W1·x + b): two weight products (through `project`), one bias."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        self.w_in = nnx.Param(init(rngs.params(), (D, 2 * D)), role="weight")
        self.bias = nnx.Param(0.1 * jnp.ones((2 * D,)))
        self.w_out = nnx.Param(init(rngs.params(), (2 * D, D)), role="weight")

    def __call__(self, x):
        h = jax.nn.gelu(project("btd,df->btf", x, self.w_in) + self.bias[...])
        return x + project("btf,fd->btd", h, self.w_out)


class ConvLayer(nnx.Module):
    """x + tanh(conv1d(x)) over the length axis, a plain `nnx.Conv`."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(D, D, kernel_size=3, padding="SAME", rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.conv(x))


def plain_layer(params, x):
    """The MLP layer as a plain function of a dict of arrays (no NNX): the pipeline takes it
    as it is; its weights' gradients are computed whole in B."""
    h = jax.nn.gelu(x @ params["w_in"] + params["bias"])
    return x + h @ params["w_out"]


def loss_fn(readout, y, targets):
    """A linear read-out and mean squared error: the 'head' of these models."""
    return jnp.mean((y @ readout - targets) ** 2)


@functools.cache
def model(kind: str):
    """(layer graphdef, stacked layer state, read-out, xs, targets), fixed by seed."""
    layer_type = {"mlp": MLPLayer, "plain": MLPLayer, "conv": ConvLayer}[kind]
    states = [nnx.split(layer_type(nnx.Rngs(i)))[1] for i in range(LAYERS)]
    layer = nnx.split(layer_type(nnx.Rngs(0)))[0]
    if kind == "plain":  # the same weights as plain arrays, and the layer as a function
        states = [{k: v[...] for k, v in nnx.to_pure_dict(s).items()} for s in states]
        layer = plain_layer
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    rng = np.random.default_rng(0)
    readout = jnp.asarray(rng.normal(size=(D, 3)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(M, ROWS, T, D)), jnp.float32)
    targets = jnp.asarray(rng.normal(size=(M, ROWS, T, 3)), jnp.float32)
    return layer, stacked, readout, xs, targets


@functools.cache
def unpipelined(kind: str):
    """Loss and gradients on one device: the layers in order on each micro-batch, mean loss."""
    layer, stacked, readout, xs, targets = model(kind)

    def loss(stacked, readout, xs):
        def one(x, t):
            y = jax.lax.scan(lambda h, s: (apply_layer(layer, s, h), None), x, stacked)[0]
            return loss_fn(readout, y, t)
        return jnp.mean(jax.vmap(one)(xs, targets))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(stacked, readout, xs)


def pipelined(kind: str, schedule, mesh_spec="data=2,stage=2,tensor=2", remat="none",
              stage_layers=None, **axes):
    layer, stacked, readout, xs, targets = model(kind)

    def loss(stacked, readout, xs):
        return pipelined_loss(layer, stacked, xs, targets, loss_fn, readout, schedule, remat,
                              stage_layers, **axes)

    mesh = make_mesh(mesh_spec) if isinstance(mesh_spec, str) else mesh_spec
    with jax.set_mesh(mesh):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(stacked, readout, xs)


RUNS = [(kind, name) for kind in ("mlp", "conv") for name in SCHEDULES]


def assert_matches_unpipelined(kind, loss, grads):
    ref_loss, ref_grads = unpipelined(kind)
    assert rel_err(loss, ref_loss) <= RTOL, (loss, ref_loss)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), r in zip(leaves, jax.tree.leaves(ref_grads), strict=True):
        assert rel_err(g, r) <= RTOL, (jax.tree_util.keystr(path), rel_err(g, r))


@pytest.mark.parametrize("kind,name", RUNS, ids=[f"{k}-{n}" for k, n in RUNS])
def test_any_layer_stack_with_every_schedule_matches_unpipelined(kind, name):
    schedule = make_schedule(name, 2, M, chunks_needed(name))
    assert_matches_unpipelined(kind, *pipelined(kind, schedule))


@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_a_plain_function_stage_matches_unpipelined(name):
    """A stage given as a plain function (params, x) -> y of a pytree of arrays, no NNX."""
    assert_matches_unpipelined("plain", *pipelined("plain", make_schedule(name, 2, M)))


def test_any_mesh_axis_names():
    """A mesh of the caller's own: its axis "pp" splits the stages, "dp" the rows."""
    mesh = jax.make_mesh((2, 4), ("pp", "dp"), axis_types=(AxisType.Auto,) * 2)
    schedule = make_schedule("zb-v", 2, M, 2)
    assert_matches_unpipelined("mlp", *pipelined("mlp", schedule, mesh, stage_axis="pp",
                                                 data_axes=("dp",)))
    with pytest.raises(ConfigError, match="no axis 'data'; name the mesh axes"):
        pipelined("mlp", schedule, mesh, stage_axis="pp")


@pytest.mark.parametrize("name", SCHEDULES)
def test_uneven_stages_match_unpipelined(name):
    """Layers per virtual stage given, with every schedule: the [L] stack is padded inside,
    padding slots are skipped (split schedules: in W too), a virtual stage may hold no layer
    (two chunks: 1, 2, 0, 1); gradients come back [L]."""
    stage_layers = {1: (3, 1), 2: (1, 2, 0, 1)}[chunks_needed(name)]
    schedule = make_schedule(name, 2, M, chunks_needed(name))
    assert_matches_unpipelined("mlp", *pipelined("mlp", schedule, stage_layers=stage_layers))


class TwiceLayer(nnx.Module):
    """x + tanh(W·tanh(W·x)): one weight in two products."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (D, D)))

    def __call__(self, x):
        return x + jnp.tanh(project("btd,de->bte", jnp.tanh(project("btd,de->bte", x, self.w)),
                                    self.w))


def test_a_weight_in_two_products_is_refused_by_a_split_schedule():
    """A split backward keeps one (input, output gradient) per weight: a weight used twice
    would sum two products' into one tap, a wrong weight gradient, so it is refused by name."""
    layer = nnx.split(TwiceLayer(nnx.Rngs(0)))[0]
    stacked = jax.tree.map(lambda *a: jnp.stack(a),
                           *(nnx.split(TwiceLayer(nnx.Rngs(i)))[1] for i in range(LAYERS)))
    _, _, readout, xs, targets = model("mlp")
    with jax.set_mesh(make_mesh("data=2,stage=2,tensor=2")):
        with pytest.raises(ConfigError, match="goes through `project` twice"):
            jax.eval_shape(lambda w: pipelined_loss(layer, w, xs, targets, loss_fn, readout,
                                                    make_schedule("zb-h1", 2, M)), stacked)


def test_bad_sizes_are_one_line():
    """The schedule must fit the inputs, the mesh and the layer count."""
    for schedule, mesh, words in ((make_schedule("1f1b", 2, M + 1), "data=2,stage=2,tensor=2",
                                   "micro-batches"),
                                  (make_schedule("1f1b", 4, M), "data=2,stage=2,tensor=2",
                                   "'stage' axis is 2"),
                                  (make_schedule("1f1b", 8, M), "stage=8", "do not split")):
        with pytest.raises(ConfigError, match=words):
            pipelined("mlp", schedule, mesh)
    with pytest.raises(ConfigError, match=r"4 layers do not split .* as \[3, 2\]"):
        pipelined("mlp", make_schedule("1f1b", 2, M), stage_layers=(3, 2))


def test_readme_example_runs_as_written_and_matches_unpipelined():
    """The README's `pipelined_loss` example, executed as it stands there (imports, devices,
    shapes, both gradients), against its layers applied in order on one device."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    assert "pipelined_loss(" in code
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # prints the loss, as a user would see it

    def loss(stacked, head):
        xs = ns["xs"]
        y = xs.reshape(-1, *xs.shape[2:])  # all micro-batches' rows at once
        for k in range(jax.tree.leaves(stacked)[0].shape[0]):
            y = nnx.merge(ns["layer"], jax.tree.map(lambda a, k=k: a[k], stacked))(y)
        y = y.reshape(xs.shape)
        return jnp.mean(jax.vmap(ns["loss_fn"], in_axes=(None, 0, 0))(head, y, ns["targets"]))

    ref_loss, ref_grads = jax.value_and_grad(loss, argnums=(0, 1))(ns["stacked"], ns["head"])
    assert rel_err(ns["loss"], ref_loss) <= RTOL, (ns["loss"], ref_loss)
    for g, r in zip(jax.tree.leaves((ns["d_stacked"], ns["d_head"])), jax.tree.leaves(ref_grads),
                    strict=True):
        assert rel_err(g, r) <= RTOL, rel_err(g, r)
