"""Closed forms of DESIGN section 2 (collectives) and the model FLOPs, and attribution of each
measured collective to the part of the model that causes it.

Symbols as in DESIGN: b global batch, m micro-batches, s sequence, h width, L layers,
d = data x fsdp, p stage, t tensor. X_mb = (b/d/m)·s·h·e bytes with e the compute dtype's size.
All figures are per device and per train step, counted the way `spmd.hlo` counts the compiled
program: an op inside a loop counts once per trip, and an op inside a `lax.cond` branch counts
on every trip of the enclosing loop (the branch is not known statically). For GPipe that means
the per-layer ops count on all m + p - 1 ticks, bubble ticks included.

On XLA CPU a reduce-scatter forced by a sharding constraint is lowered as all-reduce +
dynamic-slice, so with sequence parallelism the compiled program holds all-reduce(X) +
all-gather(X) per row-parallel output, not reduce-scatter + all-gather (same Megatron points,
ring cost 2x the reduce-scatter's).
"""

from __future__ import annotations

import dataclasses
import re

from models.config import ModelConfig
from spmd.hlo import Collective

SOURCES = ("embedding", "attention q/k/v", "attention out", "MLP up/gate", "MLP down",
           "sequence-parallel gather", "head", "loss", "pipeline send/recv",
           "gradient reduction", "other")
_SCOPES = {"embed": "embedding", "attn_qkv": "attention q/k/v", "attn_out": "attention out",
           "mlp_up": "MLP up/gate", "mlp_down": "MLP down", "head": "head", "loss": "loss"}
_SCOPE_RE = re.compile(r"(?:^|[/(])(embed|attn_qkv|attn_core|attn_out|mlp_up|mlp_down|head|loss)"
                       r"(?=[)/]|$)")


@dataclasses.dataclass(frozen=True)
class Expected:
    source: str
    op: str
    bytes: int      # per device, one execution
    count: int      # executions per step (as the HLO census counts them)
    axes: tuple[str, ...]
    phase: str      # "fwd" | "bwd" | "step"

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def _ticks(schedule: str, p: int, m: int, v: int) -> int:
    if p == 1:
        return 1
    if schedule == "gpipe":
        return m + p - 1
    from pipeline.schedules import make_schedule
    from pipeline.simulate import simulate

    return simulate(make_schedule(schedule, p, m, v)).ticks


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per kind: 'layer_tp' (split over tensor), 'layer_rep', 'embedding',
    'positions', 'head_tp', 'head_rep'; per layer for the layer kinds."""
    h, f, k, hd, n = cfg.d_model, cfg.d_ff, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    gated, gpt2 = cfg.style == "llama", cfg.style == "gpt2"
    ins = 2 if gated else 1
    layer_tp = h * k * (n // k + 2) * hd + n * hd * h + h * ins * f + f * h
    if gpt2:
        layer_tp += k * (n // k + 2) * hd + ins * f
    return {"layer_tp": layer_tp, "layer_rep": (4 if gpt2 else 2) * h + (2 * h if gpt2 else 0),
            "embedding": cfg.padded_vocab * h,
            "positions": cfg.max_seq_len * h if gpt2 else 0,
            "head_tp": 0 if cfg.tie_embeddings else h * cfg.padded_vocab,
            "head_rep": 2 * h if gpt2 else h}


def grad_bytes_per_device(cfg: ModelConfig, mesh: dict[str, int]) -> int:
    """Gradient bytes one device all-reduces over data: its parameter shard, float32
    (≈ |θ|/(t·p); embedding, head and norms are not split over stage)."""
    c, t, p = param_counts(cfg), mesh["tensor"], mesh["stage"]
    per = (c["layer_tp"] // t + c["layer_rep"]) * cfg.n_layers // p
    return 4 * (per + c["embedding"] // t + c["positions"] + c["head_tp"] // t + c["head_rep"])


def expected(cfg: ModelConfig, mesh: dict[str, int], batch: int, seq: int, microbatches: int = 1,
             schedule: str = "gpipe", virtual_stages: int = 1,
             sequence_parallel: bool = False) -> list[Expected]:
    """DESIGN section 2's collectives for one train step, per device."""
    d, p, t = mesh["data"] * mesh["fsdp"], mesh["stage"], mesh["tensor"]
    m = microbatches if p > 1 else 1
    e = cfg.dtype.itemsize
    b_shard = batch // d
    x_shard, x_mb = b_shard * seq * cfg.d_model * e, b_shard // m * seq * cfg.d_model * e
    ticks = _ticks(schedule, p, m, virtual_stages)
    # Executions of each layer's body per device: every tick for GPipe (cond counted
    # statically), else once per micro-batch; executor B recomputes the stage forward.
    runs = cfg.n_layers // p * (ticks if p > 1 and schedule == "gpipe" else m)
    fwd_runs = runs * (2 if p > 1 and schedule != "gpipe" else 1)
    rows: list[Expected] = []
    tp = ("tensor",)
    if t > 1:
        for src in ("attention out", "MLP down"):  # row-parallel outputs
            rows.append(Expected(src, "all-reduce", x_mb, fwd_runs, tp, "fwd"))
            if sequence_parallel:  # transpose of the reduce-scatter
                rows.append(Expected(src, "all-gather", x_mb, runs, tp, "bwd"))
        for src in ("attention q/k/v", "MLP up/gate"):  # column-parallel inputs
            rows.append(Expected(src, "all-reduce", x_mb, runs, tp, "bwd"))  # Megatron's f
            if sequence_parallel:
                rows.append(Expected("sequence-parallel gather", "all-gather", x_mb, fwd_runs,
                                     tp, "fwd"))
        if sequence_parallel:  # norm (and gpt2 bias) gradients of sequence-sharded blocks
            rep = param_counts(cfg)["layer_rep"] * 4
            rows.append(Expected("other", "all-reduce", rep, runs, tp, "bwd"))
        rows.append(Expected("embedding", "all-reduce", x_shard, 1, tp, "fwd"))
        if sequence_parallel:
            rows.append(Expected("embedding", "all-gather", x_shard, 1, tp, "bwd"))
            rows.append(Expected("head", "all-gather", x_shard, 1, tp, "fwd"))
        head_split = p if p > 1 and schedule == "gpipe" and m % p == 0 else 1
        # The head's input gradient is all-reduced at the data shard's full size even when
        # GPipe splits the head over `stage` (measured); the loss statistics are split.
        rows.append(Expected("head", "all-reduce", x_shard, 1, tp, "bwd"))
        rows.append(Expected("loss", "all-reduce", 3 * b_shard * seq * 4 // head_split, 1, tp,
                             "fwd"))
    if p > 1:
        for phase in ("fwd", "bwd"):
            rows.append(Expected("pipeline send/recv", "collective-permute", x_mb, ticks,
                                 ("stage",), phase))
    if d > 1:
        axes = tuple(a for a in ("data", "fsdp") if mesh[a] > 1)
        rows.append(Expected("gradient reduction", "all-reduce", grad_bytes_per_device(cfg, mesh),
                             1, axes, "step"))
    return rows


def by_kind(rows) -> dict[str, int]:
    """Total bytes per op kind, for Expected or measured Collective rows alike."""
    out: dict[str, int] = {}
    for r in rows:
        out[r.op] = out.get(r.op, 0) + r.total_bytes
    return out


def model_flops(cfg: ModelConfig, batch: int, seq: int, remat: bool = False) -> float:
    """Model FLOPs of one train step, all devices together: PaLM's formula (Chowdhery et al.
    2022, appendix B), per token 6·N + 12·L·h·s, N the matmul parameters (embedding lookup,
    norms and biases excluded; the head included). Causal masking is not discounted.
    With rematerialisation the forward runs twice: 8·N instead of 6·N (hardware FLOPs)."""
    c = param_counts(cfg)
    n = c["layer_tp"] * cfg.n_layers + (c["head_tp"] or c["embedding"])
    return batch * seq * ((8 if remat else 6) * n + 12 * cfg.n_layers * cfg.d_model * seq)


def attribute(c: Collective) -> str:
    """Which part of the model a compiled collective belongs to, from its op and axes and the
    named scopes in its op_name (a fused op is named by its first component)."""
    if c.op == "collective-permute" and "stage" in c.axes:
        return "pipeline send/recv"
    if (c.op in ("all-reduce", "reduce-scatter") and "tensor" not in c.axes
            and {"data", "fsdp"} & set(c.axes)):
        return "gradient reduction"
    first = c.name.split(":")[0]
    scope = _SCOPE_RE.findall(first) or _SCOPE_RE.findall(c.name)
    if scope and scope[-1] in _SCOPES:
        return _SCOPES[scope[-1]]
    if c.op == "all-gather" and c.axes == ("tensor",) and "while/body" in c.name:
        return "sequence-parallel gather"  # at a block's norm, before a column-parallel input
    return "other"


def phase(c: Collective) -> str:
    return "bwd" if "transpose(" in c.name.split(":")[0] else "fwd"


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
