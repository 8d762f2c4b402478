"""Closed forms of docs/design.md §2 (collectives) and the model FLOPs, and attribution of each
measured collective to the part of the model that causes it.

Symbols as in docs/design.md: b global batch, m micro-batches, s sequence, h width, L layers,
d = data x fsdp, p stage, t tensor, cp context (each device holds s/cp of the sequence). X_mb = (b/d/m)·s·h·e bytes with e the compute dtype's size.
Collectives are given per device and per train step, as executions on each stage: what the
step runs (`tppjax.measure.census` reads the same from the compiled program, weighting each pipeline
action by the ticks of the schedule table that run it). A stage that idles runs nothing.

On XLA CPU a reduce-scatter forced by a sharding constraint is lowered as all-reduce +
dynamic-slice, so with sequence parallelism the compiled program holds all-reduce(X) +
all-gather(X) per row-parallel output, not reduce-scatter + all-gather (same Megatron points,
ring cost 2x the reduce-scatter's).
"""

from __future__ import annotations

import dataclasses
import re

from tppjax.measure.hlo import Collective
from tppjax.models.config import ModelConfig
from tppjax.pipeline.layout import StageLayout
from tppjax.spmd.context import context
from tppjax.spmd.rules import BATCH_AXES, CONTEXT_AXIS, WEIGHT_AXIS, batch_shards

SOURCES = ("embedding", "attention q/k/v", "attention out", "MLP up/gate", "MLP down",
           "attention ring", "sequence-parallel gather", "head", "loss", "pipeline send/recv",
           "pipeline boundary", "interleaved placement", "FSDP weight gather",
           "gradient reduction", "other")
_SCOPES = {"embed": "embedding", "attn_qkv": "attention q/k/v",
           "attn_core": "attention ring", "attn_out": "attention out",
           "mlp_up": "MLP up/gate", "mlp_down": "MLP down", "head": "head", "loss": "loss"}
_SCOPE_RE = re.compile(r"(?:^|[/(])(embed|attn_qkv|attn_core|attn_out|mlp_up|mlp_down|head|loss)"
                       r"(?=[)/]|$)")


@dataclasses.dataclass(frozen=True)
class Expected:
    source: str
    op: str
    bytes: int                  # per device, one execution
    counts: tuple[int, ...]     # executions per step on each stage (one entry: no pipeline)
    axes: tuple[str, ...]
    phase: str                  # as `tppjax.measure.census.phase`: F, B, W, head/loss, recompute, step

    @property
    def count(self) -> float:
        """Executions per step per device, the mean over stages."""
        return sum(self.counts) / len(self.counts)

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.count


def send_ticks(schedule: str, p: int, m: int, v: int) -> dict[str, int]:
    """Per send scope of the executor (`pipeline.table.SENDS`), the ticks of its loop (the
    schedule simulated with unit-time actions) on which some stage receives one: the sends that
    run."""
    from tppjax.pipeline.table import plan, sends

    return {name: int(t.sum()) for name, t in sends(plan(schedule, p, m, v)).items()}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per kind: 'layer_tp' (split over tensor), 'layer_matmul' (its weights,
    without gpt2's biases), 'layer_rep', 'embedding', 'positions', 'head_tp', 'head_rep'; per
    layer for the layer kinds."""
    h, f, k, hd, n = cfg.d_model, cfg.d_ff, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    gated, gpt2 = cfg.style == "llama", cfg.style == "gpt2"
    ins = 2 if gated else 1
    layer_matmul = h * k * (n // k + 2) * hd + n * hd * h + h * ins * f + f * h
    layer_tp = layer_matmul + (k * (n // k + 2) * hd + ins * f if gpt2 else 0)
    return {"layer_tp": layer_tp, "layer_matmul": layer_matmul,
            "layer_rep": (4 if gpt2 else 2) * h + (2 * h if gpt2 else 0),
            "embedding": cfg.padded_vocab * h,
            "positions": cfg.max_seq_len * h if gpt2 else 0,
            "head_tp": 0 if cfg.tie_embeddings else h * cfg.padded_vocab,
            "head_rep": 2 * h if gpt2 else h}


def layer_bytes(cfg: ModelConfig, t: int) -> int:
    """One layer's parameters on one device, float32 (split over tensor where they are)."""
    c = param_counts(cfg)
    return 4 * (c["layer_tp"] // t + c["layer_rep"])


def grad_bytes_per_device(cfg: ModelConfig, mesh: dict[str, int], seq: int,
                          slots: int) -> int:
    """Gradient bytes one device all-reduces over data: its parameter shard, float32
    (≈ |θ|/(t·p); embedding, head and norms are not split over stage). Of gpt2's learned
    positions only the `seq` rows in use have a gradient that is not known to be zero. Uneven
    stages reduce their padding slots' (zero) gradients too: `slots` layers in all, L
    when even."""
    c, t, p = param_counts(cfg), mesh["tensor"], mesh["stage"]
    positions = min(seq, cfg.max_seq_len) * cfg.d_model if c["positions"] else 0
    return (layer_bytes(cfg, t) * slots // p
            + 4 * (c["embedding"] // t + positions + c["head_tp"] // t + c["head_rep"]))


def head_bytes_per_device(cfg: ModelConfig, t: int) -> int:
    """The pipeline's head parameters on one device, float32: final norm, output weight or, when
    tied, the embedding (the executor's last stage multiplies by it)."""
    c = param_counts(cfg)
    return 4 * (c["head_rep"] + (c["head_tp"] or c["embedding"]) // t)


def stage_layer_counts(cfg: ModelConfig, p: int, schedule: str = "gpipe", microbatches: int = 1,
                       virtual_stages: int = 1, stage_layers=None) -> tuple[int, ...]:
    """Real layers on each stage: L/p, or with uneven stages (`stage_layers`: layers per
    virtual stage) the layers of the virtual stages that the schedule places on it."""
    if stage_layers is None:
        return (cfg.n_layers // p,) * p
    from tppjax.pipeline.schedules import make_schedule
    from tppjax.spmd.pipelined import stage_map

    sched = make_schedule(schedule, p, microbatches, virtual_stages)
    return tuple(sum(map(len, chunks)) for chunks in stage_map(StageLayout(stage_layers), sched))


def _slots(cfg: ModelConfig, p: int, virtual_stages: int, stage_layers=None) -> int:
    """Layer slots per virtual stage: L/(p·v), or uneven, the largest count (padded to it)."""
    if stage_layers is None:
        return cfg.n_layers // (p * virtual_stages)
    return StageLayout(tuple(stage_layers)).slots_per_stage


def expected(cfg: ModelConfig, mesh: dict[str, int], batch: int, seq: int, microbatches: int = 1,
             schedule: str = "gpipe", virtual_stages: int = 1,
             sequence_parallel: bool = False, remat: str = "none",
             stage_layers=None) -> list[Expected]:
    """docs/design.md §2's collectives for one train step: bytes per device and executions on
    each stage (every stage runs every micro-batch through its layers, L/p or, uneven, its
    `stage_layers`; the last stage also runs the head and the loss, once per micro-batch)."""
    d, p, t = batch_shards(mesh), mesh["stage"], mesh["tensor"]
    m = microbatches if p > 1 else 1
    e, h, sp = cfg.dtype.itemsize, cfg.d_model, sequence_parallel
    b_shard, cp = batch // d, mesh.get(CONTEXT_AXIS, 1)
    x_shard, x_mb = b_shard * seq // cp * h * e, b_shard // m * seq // cp * h * e
    runs = tuple(n * m for n in stage_layer_counts(cfg, p, schedule, m, virtual_stages,
                                                   stage_layers))  # layer executions per stage
    twice = tuple(2 * r for r in runs)
    # Where a pipeline's `shard_map` makes `context` manual, as the data axes (`spmd.context`).
    ctx = context(mesh)
    manual_cp = p > 1 and ctx is not None and ctx.pipeline_axis is not None
    last = (0,) * (p - 1) + (m,)  # the head and the loss: the last stage, per micro-batch
    once = (1,) * p
    tp, ar, ag = ("tensor",), "all-reduce", "all-gather"
    rows: list[Expected] = []

    def add(source, op, size, counts, axes, phase):
        rows.append(Expected(source, op, size, counts, axes, phase))

    if t > 1:
        # Megatron: the row-parallel outputs all-reduce forward (with SP: reduce-scatter, which
        # CPU lowers as all-reduce + slice, and whose transpose is an all-gather backward); the
        # column-parallel inputs all-reduce their input gradient backward (Megatron's f), and
        # with SP all-gather T forward (whose transpose is the all-reduce backward).
        layer_fwd = [("attention out", ar, runs), ("MLP down", ar, runs)]
        if sp:
            layer_fwd.append(("sequence-parallel gather", ag, twice))
        for source, op, counts in layer_fwd:
            add(source, op, x_mb, counts, tp, "F")
        for source in ("attention q/k/v", "MLP up/gate"):
            add(source, ar, x_mb, runs, tp, "B")
            if sp:
                add({"attention q/k/v": "attention out", "MLP up/gate": "MLP down"}[source],
                    ag, x_mb, runs, tp, "B")
        if sp:  # norm (and gpt2 bias) gradients of sequence-sharded blocks
            add("other", ar, param_counts(cfg)["layer_rep"] * 4, runs, tp, "B")
        if _whole_forward_again(cfg, remat, p, virtual_stages, stage_layers):  # B re-runs it
            for source, op, counts in layer_fwd:
                add(source, op, x_mb, counts, tp, "recompute")
        elif remat != "none":  # each layer re-run in its backward, its output not needed
            add("attention out", ar, x_mb, runs, tp, "recompute")
            if sp:
                add("sequence-parallel gather", ag, x_mb, twice, tp, "recompute")
        add("embedding", ar, x_shard, once, tp, "F")
        if sp:  # T gathered before the head, and its final norm's gradient summed
            add("embedding", ag, x_shard, once, tp, "B")
            add("head", ag, x_mb, last, tp, "head/loss" if p > 1 else "F")
            add("head", ar, param_counts(cfg)["head_rep"] * 4, last, tp,
                "head/loss" if p > 1 else "B")
        add("head", ar, x_mb, last, tp, "head/loss" if p > 1 else "B")
        # The loss's three statistics (max, sum of exponentials, target logit), one float per
        # token each; XLA may carry one of them in the head's all-reduce.
        add("loss", ar, b_shard // m * seq // cp * 4, tuple(3 * n for n in last), tp,
            "head/loss" if p > 1 else "F")
    if p > 1:
        for name, n in send_ticks(schedule, p, m, virtual_stages).items():
            add("pipeline send/recv", "collective-permute", x_mb // (t if sp else 1), (n,) * p,
                ("stage",), "F" if "activation" in name else "B")
        # After the loop: the head's gradient (from the last stage), the input gradient (from
        # stage 0, float32: `pipeline.gpipe.widen`; split over T with SP, or manual context)
        # and the loss, summed over stages once.
        dx = b_shard * seq * h * 4 // (t if sp else 1) // (cp if manual_cp else 1)
        add("pipeline boundary", ar, head_bytes_per_device(cfg, t) + dx + 4, once, ("stage",),
            "step")
        if virtual_stages > 1:
            # Stage s runs layers that the canonical layout (contiguous over `stage`) keeps on
            # other stages: every step they arrive in rounds of collective-permutes, one chunk
            # per round (`pipeline.layout.chunk_moves`), and their gradients go back.
            from tppjax.pipeline.layout import chunk_moves
            from tppjax.pipeline.schedules import make_schedule

            # A chunk moves whole, with its padding slots (uneven stages).
            chunk = layer_bytes(cfg, t) * _slots(cfg, p, virtual_stages, stage_layers)
            for _ in chunk_moves(make_schedule(schedule, p, m, virtual_stages)):
                for phase in "FB":
                    add("interleaved placement", "collective-permute", chunk, once, ("stage",),
                        phase)
    fsdp = mesh[WEIGHT_AXIS] > 1
    if fsdp and p == 1:
        # ZeRO-3: each layer's weights gathered over fsdp before its forward and again before
        # its backward (still split over tensor), the head's before its forward (its norm again
        # in the backward); the embedding lookup trades rows for columns (all-to-all) instead.
        c, f = param_counts(cfg), (WEIGHT_AXIS,)
        for phase in "FB":
            add("FSDP weight gather", ag, layer_bytes(cfg, t), (cfg.n_layers,), f, phase)
        add("FSDP weight gather", ag, 4 * (c["head_tp"] // t + c["head_rep"]), once, f, "F")
        add("FSDP weight gather", ag, 4 * c["head_rep"], once, f, "B")
        add("embedding", "all-to-all", x_shard, once, f, "F")
        add("embedding", "all-to-all", x_shard, once, f, "B")
        if t > 1:  # the token ids, to the devices holding their rows
            add("embedding", "collective-permute", b_shard * seq * 4, once, (WEIGHT_AXIS, "tensor"),
                "F")
    if cp > 1:
        rows.extend(ring_sends(cfg, mesh, batch, seq, remat, m, runs))
    if cp > 1 and not manual_cp:
        # Every context shard holds all the weights: their gradients are summed over it, as
        # over the data axes (XLA may fold both into one reduction, or sum layers in the loop).
        add("gradient reduction", ar, grad_bytes_per_device(cfg, mesh, seq, cfg.n_layers), once,
            (CONTEXT_AXIS,), "step")
    if d > 1 or manual_cp:
        axes = tuple(a for a in BATCH_AXES if mesh[a] > 1) + ((CONTEXT_AXIS,) * manual_cp)
        extra = 0
        if p > 1:  # the loss; a tied embedding's head part is averaged in the loop's boundary
            extra = 4 + (param_counts(cfg)["embedding"] // t * 4 if cfg.tie_embeddings else 0)
        elif fsdp:  # the embedding's gradient left with its all-to-all
            extra = -4 * param_counts(cfg)["embedding"] // t
        slots = StageLayout(tuple(stage_layers)).slots if stage_layers else cfg.n_layers
        add("gradient reduction", ar, grad_bytes_per_device(cfg, mesh, seq, slots) + extra, once,
            axes, "step")
    return rows


def model_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step, all devices together: PaLM's formula (Chowdhery et al.
    2022, appendix B), per token 6·N + 12·L·h·s, N the matmul parameters (embedding lookup,
    norms and biases excluded; the head included). Causal masking is not discounted."""
    c = param_counts(cfg)
    n = c["layer_matmul"] * cfg.n_layers + (c["head_tp"] or c["embedding"])
    return batch * seq * (6 * n + 12 * cfg.n_layers * cfg.d_model * seq)


def _whole_forward_again(cfg: ModelConfig, remat: str, stages: int, virtual_stages: int,
                         stage_layers=None) -> bool:
    """Whether the backward re-runs every product of the forward. remat "layer" re-runs each
    layer in its backward but not its last product (the MLP down-projection: its output is not
    needed there); so does "stage" when a stage holds one layer (XLA drops the loop of one trip,
    then the unused product). With more layers (or slots, uneven), layer i's output is layer
    i+1's input, and the loop body, the same for every layer, computes it for all."""
    return remat == "stage" and stages > 1 and _slots(cfg, stages, virtual_stages,
                                                      stage_layers) > 1


def recompute_flops(cfg: ModelConfig, batch: int, seq: int, remat: str, stages: int,
                    virtual_stages: int = 1, stage_layers=None) -> float:
    """The forward matmul FLOPs that rematerialisation runs again, all devices together."""
    if remat == "none":
        return 0.0
    c, h = param_counts(cfg), cfg.d_model
    matmuls = c["layer_matmul"]
    if not _whole_forward_again(cfg, remat, stages, virtual_stages, stage_layers):
        matmuls -= cfg.d_ff * h
    return batch * seq * cfg.n_layers * (2 * matmuls + 4 * h * seq)


def ring_sends(cfg: ModelConfig, mesh: dict[str, int], batch: int, seq: int,
               remat: str = "none", microbatches: int = 1, runs=None) -> list[Expected]:
    """Ring attention's sends over `context` (`spmd.context`), per step. E = the elements of
    one shard's K per micro-batch: (b/d/m)·(s/cp)·(K/t)·H, all float32. Without a pipeline,
    per layer K and V hop cp−1 times forward (collective-permutes); backward K and V hop cp−1
    times again and dK, dV cp times (the last takes them home). Inside a pipeline (`runs`:
    layer executions per stage), per layer and micro-batch K and V are all-gathered forward
    and again backward, and dK, dV go home by one reduce-scatter each (an all-to-all where
    `tensor` splits the stages too: `spmd.context.context`), all of cp·E elements (what each
    device holds after the gather, before the scatter). With remat the forward's sends run
    again."""
    cp, t, p = mesh[CONTEXT_AXIS], mesh["tensor"], mesh["stage"]
    kv = batch // batch_shards(mesh) // microbatches * (seq // cp) * (cfg.n_kv_heads // t) \
        * cfg.head_dim
    axes = (CONTEXT_AXIS,)
    if p == 1:
        op, hops = "collective-permute", 2 * (cp - 1) * cfg.n_layers
        rows = [Expected("attention ring", op, kv * 4, (hops,), axes, "F"),
                Expected("attention ring", op, kv * 4, (hops,), axes, "B"),
                Expected("attention ring", op, kv * 4, (2 * cp * cfg.n_layers,), axes, "B")]
    else:
        two = tuple(2 * r for r in runs)
        rows = [Expected("attention ring", "all-gather", cp * kv * 4, two, axes, "F"),
                Expected("attention ring", "all-gather", cp * kv * 4, two, axes, "B"),
                Expected("attention ring", "all-to-all" if t > 1 else "reduce-scatter",
                         cp * kv * 4, two, axes, "B")]
    if remat != "none":
        rows.append(dataclasses.replace(rows[0], phase="recompute"))
    return rows


def source_of(name: str) -> str:
    """The part of the model an op belongs to, from the named scopes in its op_name (a fused
    op is named by its first component); "other" if none."""
    scope = _SCOPE_RE.findall(name.split(":")[0]) or _SCOPE_RE.findall(name)
    return _SCOPES.get(scope[-1], "other") if scope else "other"


def attribute(c: Collective) -> str:
    """Which part of the model a compiled collective belongs to, from its op and axes and the
    named scopes in its op_name."""
    if c.op in ("collective-permute", "all-to-all") and c.axes == ("stage",) \
            and not re.search(r"send_(activation|gradient)", c.name):
        return "interleaved placement"  # the stage's weights to the chunks of other stages
    if c.op == "collective-permute" and "stage" in c.axes:
        return "pipeline send/recv"
    if c.op == "all-gather" and c.axes == (WEIGHT_AXIS,) and source_of(c.name) != "embedding":
        return "FSDP weight gather"
    if c.op == "reduce-scatter" and c.axes == (CONTEXT_AXIS,) \
            and source_of(c.name) == "attention ring":
        return "attention ring"  # dK, dV home (`spmd.context`, inside a pipeline)
    if c.op in ("all-reduce", "reduce-scatter") and "tensor" not in c.axes:
        if "stage" in c.axes:
            return "pipeline boundary"
        if set(BATCH_AXES) & set(c.axes) or CONTEXT_AXIS in c.axes:
            return "gradient reduction"
    source = source_of(c.name)
    if source == "other" and c.op == "all-gather" and c.axes == ("tensor",) \
            and "while/body" in c.name:
        return "sequence-parallel gather"  # at a block's norm, before a column-parallel input
    return source


def _drop_common_ones(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Drop the dims that are 1 in both: XLA may keep or drop a one-layer axis."""
    if len(a) != len(b):
        return a, b
    keep = [i for i, (x, y) in enumerate(zip(a, b)) if (x, y) != (1, 1)]
    return tuple(a[i] for i in keep), tuple(b[i] for i in keep)


def _param_views(shape: tuple, logical: tuple, shard: tuple) -> list[tuple[tuple, tuple]]:
    """(per-device shard, full) dims of every view under which a parameter can be moved: the
    whole array; for a stacked [L, ...] parameter also this stage's layers [L/p, ...] (the
    pipeline's slice) and one layer [...] (sliced inside the layer scan)."""
    views = [(shard, shape)]
    if logical[:1] == ("layers",):
        views += [(shard, shard[:1] + shape[1:]), (shard[1:], shape[1:])]
    return [_drop_common_ones(s, g) for s, g in views]


def _of_view(dims: tuple, shard: tuple, full: tuple) -> bool:
    """Whether `dims` are those of the view, partly or wholly gathered (each dim a whole
    multiple of the shard's, none beyond the full parameter)."""
    return len(dims) == len(full) and all(s <= d <= f and d % s == 0
                                          for d, s, f in zip(dims, shard, full))


def _moves_view(op: str, operand: tuple, result: tuple, shard: tuple, full: tuple) -> bool:
    """Whether this operand -> result moves a tensor of the view's dims. Dims decide, not
    sizes: an activation shard of the same dims as a weight shard (sequence parallelism's
    [b/d, s/t, h] vs one layer's [heads/t, head_dim, h]) gathers a dim the weight has no room
    for. A weight may be gathered in steps (over `tensor`, then over `stage`): any step counts."""
    operand, result = _drop_common_ones(operand, result)
    if not (_of_view(operand, shard, full) and _of_view(result, shard, full)):
        return False
    return op == "all-to-all" or (result != operand
                                  and all(r % o == 0 for o, r in zip(operand, result)))


def weight_gathers(colls: list[Collective],
                   params: list[tuple]) -> list[tuple[Collective, list[str]]]:
    """The all-gathers and all-to-alls that move a parameter (or a tensor of its dims: its
    gradient, its Adam moments), each with the names of the parameters whose dims it fits.

    `params` are the rows of `spmd.loop.parameter_table` (path, global shape, logical axes,
    spec, per-device shard shape). A collective is a weight's when an operand and its result
    both have the dims of a parameter view (`_param_views`), from its per-device shard up to
    its full dims, and an all-gather's result grows some of them. Byte counts cannot tell:
    weight shards of the test models are whole multiples of an activation's bytes.
    Gathers over `fsdp` are weight gathers by design (ZeRO-3): they are reported too.
    """
    views = [(row[0], v) for row in params for v in _param_views(row[1], row[2], row[4])]
    found = []
    for c in colls:
        if c.op not in ("all-gather", "all-to-all"):
            continue
        names = sorted({name for name, (shard, full) in views
                        for o, r in zip(c.operands, c.results, strict=True)
                        if _moves_view(c.op, o, r, shard, full)})
        if names:
            found.append((c, names))
    return found
