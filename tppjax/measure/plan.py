"""A memory-aware layout planner: every layout N devices can run, its memory per device and its
step time, ranked.

Candidates: every factorisation of N over the mesh axes of `spmd.mesh.AXES` (data, fsdp, stage,
context, tensor), every schedule of `pipeline.schedules` with the chunks it
runs (`chunks_needed`), every micro-batch count m from p to 4p that divides the batch per data
shard (fewer idle the stages, more only add ticks), every remat, and the stage split that a
run would use (`spmd.pipelined.stage_layout`). A candidate is refused by the checks a run
makes (`spmd.rules.check_layout`, `spmd.pipelined.check_pipeline`, which builds and validates
the schedule), with their message as the reason.

Memory per device, in named parts (`Memory`): parameters, gradients and AdamW's two moments
from the parameters' own logical axes and `spmd.rules` (exact); the token batch; and the
activations: without stages, the residuals that autodiff keeps for the backward (read with
`jax.eval_shape` of the loss's `jax.vjp`); with stages, the executor's buffers: its slots per
stage (`pipeline.table.plan_of`, the colouring of the micro-batches in flight that it
allocates) times what F keeps per micro-batch for that remat (`pipeline.actions.StageActions`,
read with `jax.eval_shape`), plus the stage inputs and output gradients waiting in the ring
buffers, the head's residuals of one micro-batch and the gradient accumulators. Residuals are
read at one data shard's rows and s/cp of its sequence (a context shard's; the ring's own
residuals, q, k, v, output and log-sum-exp, are taken as plain attention's there); a residual
split over `tensor` (one with a heads, kv-heads, MLP or vocabulary dimension) counts 1/t,
found by reading the same residuals of a small probe model whose split sizes are primes that
no other dimension has.

Step time: F and B (and W) of one micro-batch through one virtual stage's layers, each timed
alone on one device (`measure.timing.time_actions`), through the schedule's lockstep ticks
(`predict_lockstep_s`, this executor's step), or without stages F + B of all layers; the head
and loss add `spmd.pipelined.head_cost` layers' worth per micro-batch. On N real devices each
device runs 1/t of every product; on devices emulated by a few CPU cores (`emulated_cores`, what
`--validate` measures) the step is every device's work over the cores, since an idle device
frees its core. Communication: the closed-form bytes of `measure.analysis.expected` at
`link_gbps`, plus a latency per collective execution (measured, `collective_latency_s`, when
emulated), plus FSDP's once-per-step weight gather and gradient reduce-scatter in pipelines,
which the closed forms count only without stages.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

from tppjax.errors import ConfigError
from tppjax.spmd.mesh import AXES

REMATS = ("none", "layer", "stage")
# The probe model's sizes along the dimensions that `tensor` splits (kv heads, MLP width,
# vocabulary; heads are kv heads x the real group): primes that no unsplit dimension of the
# probe (rows 3, sequence 5, layers 2, head width 2, model width 22 x group) can equal.
PROBE = {"n_kv_heads": 11, "d_ff": 13, "vocab_size": 17}


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[tuple[str, int], ...]  # (axis, size) for every axis of `spmd.mesh.AXES`
    schedule: str = "-"  # "-": no stages
    microbatches: int = 1
    virtual_stages: int = 1
    remat: str = "none"
    stage_layers: tuple[int, ...] = ()  # real layers per virtual stage; () without stages

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def mesh_spec(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.mesh if n > 1) or "data=1"

    def __str__(self) -> str:
        if self.schedule == "-":
            return f"{self.mesh_spec} remat={self.remat}"
        layers = f" layers={','.join(map(str, self.stage_layers))}" \
            if len(set(self.stage_layers)) > 1 else ""
        return (f"{self.mesh_spec}:{self.schedule} m={self.microbatches} v={self.virtual_stages}"
                f" remat={self.remat}{layers}")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device, by part."""

    params: int
    grads: int
    optimizer: int
    batch: int
    activations: int  # autodiff residuals, or the executor's stash slots
    buffers: int  # pipeline: stage inputs, output gradients, input gradients, head, accumulators

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


def factorisations(n: int, axes: tuple[str, ...] = AXES):
    """Every {axis: size} with sizes multiplying to n, in `axes` order."""
    if len(axes) == 1:
        yield {axes[0]: n}
        return
    for k in range(1, n + 1):
        if n % k == 0:
            for rest in factorisations(n // k, axes[1:]):
                yield {axes[0]: k, **rest}


def candidates(cfg, devices: int, batch: int, seq: int, fixed: dict | None = None
               ) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(candidates, refused as (layout, reason)). `fixed`: {field: value} a candidate must have
    (`mesh` as a {axis: size} dict, `schedule`, `microbatches`, `virtual_stages`, `remat`)."""
    from tppjax.pipeline.schedules import SCHEDULES, chunks_needed, make_schedule
    from tppjax.spmd.pipelined import check_pipeline, stage_layout
    from tppjax.spmd.rules import Rules, batch_shards, check_layout
    from tppjax.spmd.train_step import TrainConfig

    fixed = dict(fixed or {})
    ok, refused = [], []
    for sizes in factorisations(devices):
        if "mesh" in fixed and sizes != {**dict.fromkeys(AXES, 1), **fixed["mesh"]}:
            continue
        mesh = tuple(sizes.items())
        try:
            check_layout(cfg, sizes, batch, seq, Rules())
        except ConfigError as err:
            refused.append((Candidate(mesh).mesh_spec, str(err)))
            continue
        p = sizes["stage"]
        if p == 1:  # remat "stage" is "layer" here (the trainer checkpoints each layer)
            ok += [Candidate(mesh, remat=r) for r in REMATS[:2]]
            continue
        per_shard = batch // batch_shards(sizes)
        # m from p to 4p: fewer leave stages idle most of the step, more only add ticks.
        counts = [k for k in range(p, 4 * p + 1) if per_shard % k == 0] or [per_shard]
        for name, m, remat in itertools.product(SCHEDULES, counts, REMATS):
            v = fixed.get("virtual_stages", chunks_needed(name))
            tc = TrainConfig(microbatches=m, schedule=name, virtual_stages=v, remat=remat)
            try:
                check_pipeline(cfg, tc, sizes, batch)
            except ConfigError as err:
                refused.append((str(Candidate(mesh, name, m, v, remat)), str(err)))
                continue
            sched = make_schedule(name, p, m, v)
            device_of = [sched.place(k)[0] for k in range(p * v)]
            layers = stage_layout(cfg, p, v, seq, None, device_of).counts
            ok.append(Candidate(mesh, name, m, v, remat, tuple(layers)))
    keep = [c for c in ok if all(getattr(c, k) == v for k, v in fixed.items() if k != "mesh")]
    return keep, refused


# ---- memory -----------------------------------------------------------------------------------
def _probe_config(cfg):
    group = cfg.n_heads // cfg.n_kv_heads
    k = PROBE["n_kv_heads"]
    return dataclasses.replace(cfg, n_kv_heads=k, n_heads=k * group, d_model=2 * k * group,
                               d_ff=PROBE["d_ff"], vocab_size=PROBE["vocab_size"],
                               vocab_multiple=1, n_layers=2, max_seq_len=5)


@functools.cache
def _leaves(cfg, what: str, rows: int, seq: int, layers: int, remat: str, split: bool,
            padded: bool) -> tuple[tuple, ...]:
    """Groups of residual leaves, each leaf (shape, itemsize), of `what`: "model" (the whole
    loss under `jax.vjp`, one device, its parameters left out), "stage" (F's stash of `layers`
    layers, then its inputs and B's output gradients for W when `split`) or "head" (the head
    and loss of one micro-batch); one group, or for "stage" three."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tppjax.models import Transformer, cross_entropy
    from tppjax.pipeline.actions import StageActions

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    x = jax.ShapeDtypeStruct((rows, seq, cfg.d_model), cfg.dtype)

    def kept(fn, *args):  # the pullback's residuals that are not the arguments themselves
        pull = jax.vjp(fn, *args)[1]
        given = jax.tree.leaves(args)
        return [a for a in jax.tree.leaves(pull) if not any(a is g for g in given)]

    if what == "model":
        def loss(state, tokens):
            m = nnx.merge(graphdef, state)
            return cross_entropy(m.logits(m.run_blocks(m.embed(tokens), remat != "none")),
                                 tokens)

        out = jax.eval_shape(lambda s, tok: kept(loss, s, tok), state, tokens)
    elif what == "head":
        def head(state, y, tok):
            return cross_entropy(nnx.merge(graphdef, state).logits(y), tok)

        out = jax.eval_shape(lambda s, y, tok: kept(lambda s, y: head(s, y, tok), s, y),
                             state, x, tokens)
    else:
        block_def, stacked = nnx.split(model.blocks)
        w = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape[1:]), a.dtype), stacked)
        act = StageActions(block_def, remat, split)
        active = jnp.ones(layers, bool) if padded else None

        def stage(w, x):
            y, stash = act.forward(w, x, active)
            return stash, (), act.backward(w, stash, y, active)[2]

        out = jax.eval_shape(stage, w, x)
        return tuple(tuple((a.shape, a.dtype.itemsize) for a in group) for group in out)
    return (tuple((a.shape, a.dtype.itemsize) for a in out),)


def residual_bytes(cfg, what: str, rows: int, seq: int, t: int, layers: int = 0,
                   remat: str = "none", split: bool = False, padded: bool = False
                   ) -> tuple[int, ...]:
    """Bytes per device of each group of `_leaves`, at `rows` rows of one data shard: 1/t of
    each leaf that `tensor` splits (one whose probe shape has a split size)."""
    real = _leaves(cfg, what, rows, seq, layers, remat, split, padded)
    probe = _leaves(_probe_config(cfg), what, 3, 5, 2 if layers else 0, remat, split, padded)
    marks = {*PROBE.values(), PROBE["n_kv_heads"] * (cfg.n_heads // cfg.n_kv_heads)}
    out = []
    for group, probe_group in zip(real, probe, strict=True):
        if [len(s) for s, _ in group] != [len(s) for s, _ in probe_group]:
            raise AssertionError(f"the probe model's residuals differ from {what}'s")
        out.append(sum(math.prod(shape) * size // (t if marks & set(ps) else 1)
                       for (shape, size), (ps, _) in zip(group, probe_group, strict=True)))
    return tuple(out)


@functools.cache
def _params(cfg) -> tuple[tuple, ...]:
    """Per parameter (shape, logical axes, itemsize), read from the model's declarations."""
    import jax
    from flax import nnx

    from tppjax.models import Transformer

    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    return tuple((var.shape, var.get_metadata().get("out_sharding") or (None,) * var.ndim,
                  var.dtype.itemsize)
                 for var in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def param_bytes(cfg, sizes: dict[str, int], slots: int | None = None) -> int:
    """Float32 parameter bytes on one device: each parameter's shape divided by the mesh axes
    that `spmd.rules` maps its logical axes to; the blocks padded to `slots` layers."""
    from tppjax.spmd.rules import Rules

    rules, total = Rules(), 0
    for shape, logical, itemsize in _params(cfg):
        shape = list(shape)
        if slots is not None and "layers" in logical:
            shape[logical.index("layers")] = slots
        for i, axes in enumerate(rules.param_spec(tuple(logical))):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                shape[i] //= sizes[axis]
        total += math.prod(shape) * itemsize
    return total


def memory(cfg, c: Candidate, batch: int, seq: int) -> Memory:
    """`Memory` per device of candidate `c` (see the module docstring)."""
    from tppjax.pipeline.table import plan
    from tppjax.pipeline.layout import StageLayout
    from tppjax.spmd.rules import batch_shards

    sizes = c.sizes
    p, t, rows = sizes["stage"], sizes["tensor"], batch // batch_shards(sizes)
    seq //= sizes.get("context", 1)  # each context shard holds s/cp of every sequence
    layout = StageLayout(c.stage_layers) if c.stage_layers else None
    params = param_bytes(cfg, sizes, layout.slots if layout and layout.padded else None)
    tokens = 2 * rows * seq * 4  # inputs and targets, int32
    base = {"params": params, "grads": params, "optimizer": 2 * params, "batch": tokens}
    if p == 1:  # the loss's residuals hold the head's, which die before any recomputation
        extra = max(0, _recompute(cfg, c, rows, seq, 1)
                    - residual_bytes(cfg, "head", rows, seq, t)[0])
        return Memory(**base, buffers=0, activations=residual_bytes(
            cfg, "model", rows, seq, t, remat=c.remat)[0] + extra)
    m, v = c.microbatches, c.virtual_stages
    pl = plan(c.schedule, p, m, v)
    b_mb = rows // m
    stash, inputs, deltas = residual_bytes(cfg, "stage", b_mb, seq, t, layout.slots_per_stage,
                                           c.remat, pl.split, layout.padded)
    x_mb = b_mb * seq * cfg.d_model * cfg.dtype.itemsize
    waiting = (pl.slots["x"] + 1 + pl.slots["g"] + 1 + m + 1) * x_mb  # ring buffers, dx rows
    embedded = 2 * rows * seq * cfg.d_model * cfg.dtype.itemsize  # embed output, its gradient
    # The loop's gradient sums: the stage's weights whole over the data axes (manual there);
    # the weights too enter it whole (gathered over fsdp) and, interleaved, moved to chunks.
    whole = param_bytes(cfg, {**sizes, "fsdp": 1}, layout.slots)
    accumulators = whole * (1 + (sizes["fsdp"] > 1 or v > 1))
    # The head's residuals (in F) and B's recomputation are never alive at once.
    transient = max(residual_bytes(cfg, "head", b_mb, seq, t)[0],
                    _recompute(cfg, c, b_mb, seq, layout.slots_per_stage))
    return Memory(**base, activations=pl.slots["stash"] * stash + pl.slots["kept"] * deltas,
                  buffers=waiting + embedded + transient + accumulators)


def _recompute(cfg, c: Candidate, rows: int, seq: int, stage_layers: int) -> int:
    """With remat, what B's recomputation keeps while it runs: every intermediate of one layer
    ("layer"; without stages "stage" is "layer") or of the stage's layers ("stage")."""
    if c.remat == "none":
        return 0
    layers = stage_layers if c.remat == "stage" and c.schedule != "-" else 1
    return residual_bytes(cfg, "stage", rows, seq, c.sizes["tensor"], layers)[0]


def trainer(cfg, c: Candidate, batch: int, seq: int, devices=None):
    """The `spmd.train_step.Trainer` that runs candidate `c` (on `devices`, default all)."""
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.rules import Rules
    from tppjax.spmd.train_step import TrainConfig, Trainer

    tc = TrainConfig(microbatches=c.microbatches, schedule="gpipe" if c.schedule == "-" else
                     c.schedule, virtual_stages=c.virtual_stages, remat=c.remat,
                     stage_layers=c.stage_layers or None)
    return Trainer(cfg, tc, make_mesh(c.sizes, devices), Rules(), (batch, seq))


def compiled_peak(cfg, c: Candidate, batch: int, seq: int) -> int:
    """The compiled step's live peak per device, as `measure.timing.Layout.compile` reads it
    from `memory_analysis()`: arguments + outputs + temporaries - donated aliases."""
    import numpy as np

    tr = trainer(cfg, c, batch, seq)
    params, opt_state = tr.init(seed=0)
    tokens = np.zeros((batch, seq), np.int32)
    mem = tr.lower_step(params, opt_state, *tr.place((tokens, tokens))).compile() \
        .memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


# ---- step time ----------------------------------------------------------------------------
def step_seconds(cfg, c: Candidate, batch: int, seq: int, action_s, link_gbps: float,
                 emulated_cores: int | None = None, collective_s: float = 0.0
                 ) -> dict[str, float]:
    """{"compute_s", "comm_s", "step_s"} of candidate `c`. `action_s(layers, rows, split,
    remat)` → {kind: seconds} of one action alone (`measure.timing.time_actions`, cached by the
    caller). On real devices (`emulated_cores` None) each device runs its 1/t of the products
    and the schedule's ticks in lockstep. On N devices emulated by `emulated_cores` CPU cores,
    idle devices free the cores (docs/design.md §7): the step is the work of every device
    together over the cores. Each collective execution costs `collective_s` plus its
    closed-form bytes at `link_gbps`."""
    from tppjax.measure import analysis
    from tppjax.measure.timing import predict_lockstep_s
    from tppjax.spmd.pipelined import head_cost
    from tppjax.spmd.rules import batch_shards

    sizes = c.sizes
    p, t, d = sizes["stage"], sizes["tensor"], batch_shards(sizes)
    cp = sizes.get("context", 1)
    head = head_cost(cfg, seq)  # the head and loss, in layers' worth of work
    if p == 1:
        costs = action_s(cfg.n_layers, batch // d, False, c.remat)
        compute = (costs["F"] + costs["B"]) * (1 + head / cfg.n_layers)
        work, uneven = compute * d, None
    else:
        m, v, layers = c.microbatches, c.virtual_stages, c.stage_layers
        split = c.schedule in ("zb-h1", "zb-h2", "zb-v", "dualpipe-v")
        uneven = layers if len(set(layers)) > 1 else None
        per = {n: action_s(n, batch // d // m, split, c.remat) for n in set(layers) if n}
        widest = per[max(layers)]
        compute = predict_lockstep_s(c.schedule, p, m, v, per if uneven else widest, uneven)
        # The last stage runs the head in each micro-batch's F (and its backward there too).
        head_s = m * head * (widest["F"] + widest["B"]) / max(layers)
        compute += head_s
        work = d * (m * sum(sum(per[n].values()) for n in layers if n) + head_s)
    rows = analysis.expected(cfg, sizes, batch, seq, c.microbatches,
                             "gpipe" if p == 1 else c.schedule, c.virtual_stages, False,
                             c.remat, uneven)
    comm_s = sum(e.total_bytes / (link_gbps * 1e9) + e.count * collective_s for e in rows)
    f = sizes["fsdp"]
    if f > 1 and p > 1:  # the closed forms count FSDP's collectives only without stages
        # The pipeline gathers each weight over fsdp once per step and reduce-scatters its
        # gradient once (docs/design.md §3): two collectives per parameter, ring (f-1)/f.
        moved = param_bytes(cfg, {**sizes, "fsdp": 1}) * (f - 1) / f
        comm_s += 2 * (len(_params(cfg)) * collective_s + moved / (link_gbps * 1e9))
    # Tensor parallelism splits every product t ways, context parallelism every sequence (and,
    # zigzag, its causal attention) cp ways: 1/(t·cp) on each of t·cp devices.
    compute = compute / (t * cp) if emulated_cores is None else \
        work / min(emulated_cores, p * d * t * cp)
    return {"compute_s": compute, "comm_s": comm_s, "step_s": compute + comm_s}


def collective_latency_s(repeats: int = 20) -> float:
    """Seconds of one small all-reduce over every device of this machine (the fastest of
    `repeats`): what a collective costs beyond its bytes, where devices are emulated threads."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from tppjax.measure.timing import _fastest_s
    from tppjax.spmd.mesh import make_mesh

    mesh = make_mesh({"data": jax.device_count()})
    total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "data"), mesh=mesh,
                                  in_specs=P("data"), out_specs=P()))
    a = jax.device_put(jnp.ones(jax.device_count()), jax.NamedSharding(mesh, P("data")))
    return _fastest_s({"all-reduce": (total, (a,))}, repeats)["all-reduce"]


def timer(cfg, seq: int, repeats: int = 3):
    """`action_s` for `step_seconds`: `time_actions`, each (layers, rows, split, remat) once."""
    from tppjax.measure.timing import time_actions

    @functools.cache
    def action_s(layers, rows, split, remat):
        return time_actions(cfg, layers, rows, seq, remat, split, repeats)

    return action_s


def rank(cfg, cands: list[Candidate], batch: int, seq: int, budget_bytes: float | None,
         action_s, link_gbps: float = 50.0, **emulation) -> tuple[list[dict], list[dict]]:
    """(fitting rows fastest first, rows over `budget_bytes`). A row: the candidate, its
    `Memory`, its `step_seconds` (`emulation`: its `emulated_cores`, `collective_s`) and why
    it sits where it does."""
    from tppjax.pipeline.schedules import make_schedule
    from tppjax.pipeline.simulate import simulate

    fits, over = [], []
    for c in cands:
        mem = memory(cfg, c, batch, seq)
        row = {"layout": str(c), "candidate": c, "memory": mem}
        if budget_bytes is not None and mem.total > budget_bytes:
            row["why"] = (f"needs {mem.total / 2**20:.3f} MiB per device, over the "
                          f"{budget_bytes / 2**20:.3f} MiB budget ({_parts(mem)})")
            over.append(row)
            continue
        row.update(step_seconds(cfg, c, batch, seq, action_s, link_gbps, **emulation))
        bubble = 0.0
        if c.schedule != "-":
            bubble = simulate(make_schedule(c.schedule, c.sizes["stage"], c.microbatches,
                                            c.virtual_stages)).bubble_fraction
        row["bubble"] = bubble
        row["why"] = (f"step {row['step_s'] * 1e3:.2f} ms = compute {row['compute_s'] * 1e3:.2f}"
                      f" (bubble {bubble:.2f}) + comm {row['comm_s'] * 1e3:.2f}; memory "
                      f"{mem.total / 2**20:.2f} MiB ({_parts(mem)})")
        fits.append(row)
    fits.sort(key=lambda r: (r["step_s"], r["memory"].total))
    over.sort(key=lambda r: r["memory"].total)
    return fits, over


def _parts(mem: Memory) -> str:
    return ", ".join(f"{k} {v / 2**20:.2f}" for k, v in dataclasses.asdict(mem).items() if v)


def as_json(row: dict) -> dict:
    """A ranked row as plain JSON values."""
    c = row["candidate"]
    out = {k: v for k, v in row.items() if k not in ("candidate", "memory")}
    return {**out, "mesh": c.mesh_spec, "schedule": c.schedule, "microbatches": c.microbatches,
            "virtual_stages": c.virtual_stages, "remat": c.remat,
            "stage_layers": list(c.stage_layers),
            "memory": {**dataclasses.asdict(row["memory"]), "total": row["memory"].total}}
