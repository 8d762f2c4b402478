"""Sharded model/optimizer state and the jitted train step.

State is created already sharded (`jit(init, out_shardings=...)`): no device ever holds the full
model. The step is a pure function over (params, opt_state, batch) under `jax.jit` with donated
buffers and fixed output shardings, so params, gradients and optimizer state keep their layout.
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

from tppjax.errors import ConfigError
from tppjax.models import ModelConfig, Transformer, cross_entropy
from tppjax.spmd.context import context
from tppjax.spmd.rules import (
    BATCH_AXES,
    Rules,
    batch_shards,
    check_layout,
    param_shardings,
)

Remat = Literal["none", "layer", "stage"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    microbatches: int = 1  # pipeline micro-batches per step (m)
    schedule: str = "gpipe"
    virtual_stages: int = 1
    # Layers per virtual stage (`pipeline.layout`): None: even when they divide, else
    # balanced; "auto": balanced; or a tuple, e.g. (1, 2, 2, 1).
    stage_layers: tuple[int, ...] | str | None = None
    remat: Remat = "none"
    grad_accum: int = 1  # sequential chunks per step (gradient accumulation)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for the parameters that weight decay shrinks: the weights (projections, embedding
    tables), not the norm gains and biases. Read from the `role` each parameter declares in
    `models/`, not from its shape: stacked on `layers`, a gain is (L, D), as large as a matrix."""
    return jax.tree.map(lambda v: v.replace(v.get_metadata()["role"] == "weight"), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(tc: TrainConfig, params: nnx.State
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW, linear warm-up then cosine decay, global-norm clipping; `decay_mask(params)`."""
    lr = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        tc.learning_rate * tc.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=tc.weight_decay,
                    mask=decay_mask(params)),
    )
    return tx, lr


def _in_blocks(path) -> bool:
    """Is this leaf (of the params, or of an optimizer state that mirrors them) a block's?"""
    return any(getattr(k, "key", None) == "blocks" for k in path)


def map_blocks(fn, tree):
    """`fn` on every array of the stacked blocks in `tree` (params or optimizer state)."""
    return jax.tree_util.tree_map_with_path(lambda path, a: fn(a) if _in_blocks(path) else a,
                                            tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Token batches (B, T): B split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def check_grad_accum(k: int, batch: int, mesh_shape: dict[str, int]) -> None:
    dp = batch_shards(mesh_shape)
    per_shard = batch // dp
    if k < 1 or per_shard % k:
        raise ConfigError(
            f"the batch per data shard ({per_shard} = {batch} / data x fsdp) is not divisible "
            f"by --grad-accum {k}; choose a divisor of {per_shard} or change --batch-size"
        )


class Trainer:
    """Everything one layout needs: mesh, shardings, optimizer and the compiled functions."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh, rules: Rules, batch_shape):
        check_layout(cfg, dict(mesh.shape), batch_shape[0], batch_shape[1], rules)
        self.cfg, self.tc, self.mesh, self.rules = cfg, tc, mesh, rules
        self.stages = mesh.shape["stage"]
        check_grad_accum(tc.grad_accum, batch_shape[0], dict(mesh.shape))
        self.layout = None  # pipeline.layout.StageLayout: the layers per virtual stage
        if self.stages == 1 and tc.stage_layers not in (None, "auto"):
            raise ConfigError(f"--stage-layers {tc.stage_layers} needs pipeline stages; add "
                              "stage=N to the --mesh or drop --stage-layers")
        if self.stages > 1:
            from tppjax.pipeline.schedules import make_schedule
            from tppjax.spmd.pipelined import check_pipeline, stage_layout

            # Each accumulation chunk goes through the pipeline: it is the pipeline's batch.
            check_pipeline(cfg, tc, dict(mesh.shape), batch_shape[0] // tc.grad_accum)
            sched = make_schedule(tc.schedule, self.stages, tc.microbatches, tc.virtual_stages)
            device_of = [sched.place(k)[0] for k in range(self.stages * tc.virtual_stages)]
            self.layout = stage_layout(cfg, self.stages, tc.virtual_stages, batch_shape[1],
                                       tc.stage_layers, device_of)
        self.padded = self.layout is not None and self.layout.padded
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, canonical = nnx.split(abstract)
        self._canonical = canonical
        # Uneven stages: the state holds the blocks padded (`pipeline.layout`), so the layers
        # stay split over `stage`; checkpoints and exports hold the canonical [L] stack, split
        # over `stage` too where L divides by it, else whole on every stage while it is saved.
        abstract_params = jax.eval_shape(self._pad, canonical)
        self.param_shardings = param_shardings(abstract_params, mesh, rules)
        self.tx, self.lr = make_optimizer(tc, abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())

        def opt_shardings(abstract_params, shardings):
            return optax.tree_map_params(
                self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abstract_params),
                shardings, transform_non_params=lambda _: replicated)

        self.opt_shardings = opt_shardings(abstract_params, self.param_shardings)
        self.canonical_shardings = (self.param_shardings, self.opt_shardings)
        if self.padded:
            unsplit = ("layers",) if cfg.n_layers % self.stages else ()
            whole = param_shardings(canonical, mesh, rules, unsplit=unsplit)
            self.canonical_shardings = (whole, opt_shardings(canonical, whole))
            # Built once, for (params,) and (params, opt_state): a jit made at each call
            # compiled again at every checkpoint save and restore.
            unpad = functools.partial(map_blocks, self.layout.unpad)
            own = (self.param_shardings, self.opt_shardings)
            self._unpad = {n: jax.jit(unpad, out_shardings=self.canonical_shardings[:n])
                           for n in (1, 2)}
            self._repad = {n: jax.jit(self._pad, out_shardings=own[:n]) for n in (1, 2)}
        self.batch_sharding = batch_sharding(mesh)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding,
                          self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings,
                           {"loss": replicated, "grad_norm": replicated, "lr": replicated}),
            donate_argnums=(0, 1),
        )
        self._loss_and_grads = jax.jit(
            self._accumulated_loss_and_grads,
            out_shardings=(replicated, self.param_shardings),
        )
        # Evaluation needs no backward pass: every schedule's forward is GPipe's.
        self._loss = jax.jit(functools.partial(self.loss, forward_only=True),
                             out_shardings=replicated)

    # ---- state ------------------------------------------------------------------------
    def init(self, seed: int):
        """Parameters and optimizer state, each created directly in its sharded layout."""

        def make_params():
            with nnx.use_eager_sharding(False):
                return self._pad(nnx.split(Transformer(self.cfg, nnx.Rngs(seed)))[1])

        with jax.set_mesh(self.mesh):
            params = jax.jit(make_params, out_shardings=self.param_shardings)()
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return params, opt_state

    def _pad(self, tree):
        return map_blocks(self.layout.pad, tree) if self.padded else tree

    def to_canonical(self, *state):
        """(params,) or (params, opt_state) with the canonical [L] blocks (what checkpoints
        and exports hold): uneven stages' padding slots dropped. The same arrays when there
        are none."""
        if not self.padded:
            return state
        with jax.set_mesh(self.mesh):
            return self._unpad[len(state)](state)

    def from_canonical(self, *state):
        """Inverse of `to_canonical`: in this trainer's layout and shardings."""
        if not self.padded:
            return state
        with jax.set_mesh(self.mesh):
            return self._repad[len(state)](state)

    def parameter_count(self) -> int:
        """Parameters of the model (uneven stages' padding slots are not parameters)."""
        return sum(math.prod(a.shape) for a in jax.tree.leaves(self._canonical))

    # ---- the traced functions ---------------------------------------------------------
    def loss(self, params, inputs, targets, forward_only: bool = False):
        """Mean next-token loss over the global batch; the pipeline when `stage` > 1."""
        sequence = None  # the text in order
        cp = context(self.mesh.shape)
        if cp is not None:  # context parallelism: the tokens laid out zigzag, ring attention
            inputs, targets = cp.permute(inputs), cp.permute(targets)
            sequence = cp.sequence(inputs.shape[1])
        with flax_spmd.logical_axis_rules(self.rules.activations):
            model = nnx.merge(self.graphdef, params)
            if self.stages > 1:
                from tppjax.spmd.pipelined import pipeline_loss

                return pipeline_loss(model, inputs, targets, self.tc, self.stages, self.layout,
                                     forward_only, cp)
            return cross_entropy(model(inputs, self.tc.remat != "none", sequence), targets)

    def _accumulated_loss_and_grads(self, params, inputs, targets):
        """Loss and gradients of the global batch, in `grad_accum` sequential chunks.

        Chunk i holds rows i, i + K, i + 2K, ... (strided like pipeline micro-batches, so each
        data shard keeps its own rows: nothing moves). Every chunk has the same number of
        tokens, so the mean of the chunk means is the mean over the full batch. `lax.scan`
        runs the chunks one after another (activations of one chunk alive at a time) and
        compiles the loss once, whatever K.
        """
        k = self.tc.grad_accum
        if k == 1:
            return jax.value_and_grad(self.loss)(params, inputs, targets)
        from tppjax.pipeline.gpipe import to_microbatches

        spec = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None))
        chunks = [jax.lax.with_sharding_constraint(to_microbatches(a, k), spec)
                  for a in (inputs, targets)]

        def body(carry, chunk):
            loss, grads = jax.value_and_grad(self.loss)(params, *chunk)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = jax.lax.with_sharding_constraint(
            jax.tree.map(jnp.zeros_like, params), self.param_shardings)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), chunks)
        return loss / k, jax.tree.map(lambda g: g / k, grads)

    def _train_step(self, params, opt_state, inputs, targets):
        loss, grads = self._accumulated_loss_and_grads(params, inputs, targets)
        # Updates applied before this one (Adam's and the schedule's counters agree).
        done = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(self.lr(done), jnp.float32)}
        return params, opt_state, metrics

    # ---- callables (enter the mesh so bare PartitionSpecs resolve against it) ---------
    def step(self, params, opt_state, inputs, targets):
        with jax.set_mesh(self.mesh):
            return self._step(params, opt_state, inputs, targets)

    def loss_and_grads(self, params, inputs, targets):
        with jax.set_mesh(self.mesh):
            return self._loss_and_grads(params, inputs, targets)

    def eval_loss(self, params, inputs, targets):
        with jax.set_mesh(self.mesh):
            return self._loss(params, inputs, targets)

    def place(self, batch):
        """Host (B, T) arrays of the whole global batch → arrays sharded over the data axes."""
        return jax.device_put(batch, self.batch_sharding)

    def fetch(self, batches, step: int):
        """Step `step` of `batches` (a `spmd.data.Batches`) as global arrays sharded over the
        data axes. With several processes each reads only the rows its own devices hold, and
        `jax.make_array_from_process_local_data` assembles the global batch."""
        if jax.process_count() == 1:
            return self.place(batches(step))
        from tppjax.spmd.distributed import local_rows

        shape = (batches.batch_size, batches.seq_len)
        local = batches(step, local_rows(self.batch_sharding, shape))
        return tuple(jax.make_array_from_process_local_data(self.batch_sharding, a, shape)
                     for a in local)

    def lower_step(self, params, opt_state, inputs, targets):
        """The step's lowering, for compile-time inspection (collectives, memory, FLOPs)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(params, opt_state, inputs, targets)
