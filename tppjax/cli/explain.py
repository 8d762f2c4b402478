"""Explain where TP and PP act: per module, its shards and the collectives placed there.

    python scripts/explain.py --mesh data=2,stage=2,tensor=2 --preset tiny
    python scripts/explain.py --mesh data=4,tensor=2 --sequence-parallel --json

Compiles the real train step on emulated CPU devices, reads what it executes from the compiled
HLO (`tppjax.measure.census`: loop trip counts, and for pipelines the ticks of the schedule table that
run each action, per stage), attributes each collective to a module (`tppjax.measure.analysis.attribute`)
and sets the bytes per op kind and mesh axes beside docs/design.md §2's closed forms
(`tppjax.measure.analysis.expected`), and the executed matmul FLOPs beside the model's.
"""

import argparse
import json
import os
import sys

from tppjax.cli.flags import (
    Parser,
    add_model_flags,
    check_limits,
    check_run_flags,
    configure_devices,
    model_config,
)

# Forward order: (module, parameter-path suffixes, how tensor splits it).
MODULES = (
    ("embedding", ("embedding",), "vocab-parallel: rows (vocab) split"),
    ("attention q/k/v", ("attn/wqkv", "attn/bqkv"), "column-parallel: kv-head groups split"),
    ("attention ring", (), "context parallelism: K, V (backward: and dK, dV) around the ring"),
    ("attention out", ("attn/wo", "attn/bo"), "row-parallel: heads (contracting dim) split"),
    ("MLP up/gate", ("mlp/w_in", "mlp/b_in"), "column-parallel: mlp width split"),
    ("MLP down", ("mlp/w_down", "mlp/b_down"), "row-parallel: mlp width (contracting) split"),
    ("sequence-parallel gather", (), "sequence parallelism: T all-gathered before a block input"),
    ("head", ("head/w", "head/norm"), "vocab-parallel: columns (vocab) split"),
    ("loss", (), "vocab-parallel cross-entropy: max, sum-exp, target logit reduced"),
)


SEQ_LEN = 32  # without --seq-len (or the model's max_seq_len where shorter): compiles fast


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=None,
                    help="axis sizes over data, fsdp, stage, context, tensor (default: tensor = the "
                         "largest of 4, 2, 1 that divides the heads, kv heads and devices, the "
                         "rest data)")
    ap.add_argument("--schedule", default=None, help="pipeline schedule (stage > 1; default gpipe)")
    ap.add_argument("--microbatches", type=int, default=None,
                    help="pipeline micro-batches (stage > 1; default 2 x stages)")
    ap.add_argument("--virtual-stages", type=int, default=None,
                    help="chunks per stage (stage > 1; default 1)")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--preset", default="tiny", help="tiny | small | base")
    add_model_flags(ap)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help=f"tokens per sequence (default {SEQ_LEN}, or the model's max_seq_len "
                         "where that is shorter)")
    ap.add_argument("--remat", choices=["none", "layer", "stage"], default="none",
                    help="recompute activations in the backward pass")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="emulated CPU devices (default 8 unless XLA_FLAGS sets a count)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    check_limits(ap, args)
    return args


def explain(args: argparse.Namespace) -> dict:
    import numpy as np

    from tppjax.measure import analysis, census
    from tppjax.spmd.loop import parameter_table
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.pipelined import stage_map
    from tppjax.spmd.rules import Rules
    from tppjax.spmd.train_step import TrainConfig, Trainer

    cfg = model_config(args, "tiny")
    check_run_flags(args, cfg, SEQ_LEN)
    args.schedule, args.virtual_stages = args.schedule or "gpipe", args.virtual_stages or 1
    mesh = make_mesh(args.mesh)
    p = mesh.shape["stage"]
    m = args.microbatches or (2 * p if p > 1 else 1)
    tc = TrainConfig(microbatches=m, schedule=args.schedule,
                     virtual_stages=args.virtual_stages, remat=args.remat)
    shape = (args.batch_size, args.seq_len)
    trainer = Trainer(cfg, tc, mesh, Rules(args.sequence_parallel), shape)
    layers = trainer.layout.counts if trainer.padded else None  # uneven: per virtual stage
    params, opt_state = trainer.init(seed=0)
    inputs = trainer.place((np.zeros(shape, np.int32),) * 2)  # values do not matter here
    text = trainer.lower_step(params, opt_state, *inputs).compile().as_text()
    where = (mesh, args.schedule, m, args.virtual_stages, layers)
    measured = census.collectives(text, *where)
    table = parameter_table(trainer, params)

    groups: dict[tuple, dict] = {}
    for c in measured:
        g = groups.setdefault((c.source, c.op, c.bytes, c.axes), {
            "op": c.op, "bytes": c.bytes, "axes": list(c.axes), "counts": {}, "names": []})
        per_stage = g["counts"].setdefault(c.phase, [0.0] * p)
        g["counts"][c.phase] = [a + b for a, b in zip(per_stage, c.counts, strict=True)]
        if c.source == "other" and c.name not in g["names"]:
            g["names"].append(c.name[-120:])
    per_source = {}
    for (src, *_), g in groups.items():
        if src != "other":
            g.pop("names")
        per_source.setdefault(src, []).append(g)

    modules = []
    for name, suffixes, how in MODULES:
        rows = [{"path": path, "shape": list(shp), "spec": spec, "shard": list(shard)}
                for path, shp, _, spec, shard in table
                if any(path.endswith(s) or f"{s}/" in path for s in suffixes)]
        cols = per_source.get(name, [])
        ring = name == "attention ring"
        if (name == "sequence-parallel gather" or ring) and not cols:
            continue
        modules.append({"module": name, "parallel": how if mesh.shape["tensor"] > 1 or ring else
                        "replicated (tensor=1)", "params": rows, "collectives": cols})
    exp = analysis.expected(cfg, dict(mesh.shape), *shape, m, args.schedule,
                            args.virtual_stages, args.sequence_parallel, args.remat, layers)
    meas_kind, exp_kind = census.by_kind(measured), census.by_kind(exp)
    flops = census.flops(text, *where)
    stages = []
    for s in range(p):
        stage = {"stage": s, "bytes_by_source": {}}
        for c in measured:
            b = stage["bytes_by_source"].get(c.source, 0.0) + c.bytes * c.counts[s]
            stage["bytes_by_source"][c.source] = b
        stages.append(stage)
    model = analysis.model_flops(cfg, *shape)
    out = {
        "mesh": dict(mesh.shape), "preset": args.preset, "batch": shape[0], "seq": shape[1],
        "sequence_parallel": args.sequence_parallel, "remat": args.remat, "modules": modules,
        "pipeline": per_source.get("pipeline send/recv", []),
        "pipeline_boundary": per_source.get("pipeline boundary", []),
        "interleaved_placement": per_source.get("interleaved placement", []),
        "fsdp_weight_gather": per_source.get("FSDP weight gather", []),
        "gradient_reduction": per_source.get("gradient reduction", []),
        "other": per_source.get("other", []),
        "bytes_by_kind": {f"{op} over {','.join(axes)}": {
            "measured": meas_kind.get((op, axes), 0), "analytical": exp_kind.get((op, axes), 0)}
            for op, axes in sorted(set(meas_kind) | set(exp_kind))},
        "expected": [vars(e) | {"axes": list(e.axes), "counts": list(e.counts)} for e in exp],
        "stages": stages,
        "model_flops": model,
        "recompute_flops_analytical": analysis.recompute_flops(cfg, *shape, args.remat, p,
                                                               args.virtual_stages, layers),
        "executed_flops": sum(flops["dot"].values()),
        "executed_flops_by_phase": flops["dot"],
        "elementwise_flops": sum(flops["elementwise"].values()),
    }
    if p > 1:
        from tppjax.pipeline.draw import ascii_timeline
        from tppjax.pipeline.schedules import make_schedule
        from tppjax.pipeline.simulate import simulate

        sched = make_schedule(args.schedule, p, m, args.virtual_stages)
        sim = simulate(sched)
        ticks, runs = census.action_ticks(args.schedule, p, m, args.virtual_stages, layers)
        out["pipeline_schedule"] = {
            "schedule": args.schedule, "microbatches": m, "virtual_stages": args.virtual_stages,
            "bubble_fraction": sim.bubble_fraction, "timeline": ascii_timeline(sim),
            "ticks": ticks, "actions_per_stage": {k: v.tolist() for k, v in runs.items()},
            "stage_map": [[[r.start, r.stop - 1] for r in chunks]
                          for chunks in stage_map(trainer.layout, sched)]}
    return out


def _counts(counts: dict, stages: int) -> str:
    if stages == 1:
        return "  ".join(f"{ph} x{n[0]:g}" for ph, n in counts.items())
    return "  ".join(f"{ph} x[{' '.join(f'{k:g}' for k in n)}]" for ph, n in counts.items())


def _colls(cols: list[dict], stages: int, indent: str = "    ") -> list[str]:
    if not cols:
        return [f"{indent}no collective"]
    return [f"{indent}{c['op']:<19}{c['bytes']:>10,} B  over {','.join(c['axes']):<13}"
            f"{_counts(c['counts'], stages)}"
            + (f"  ({'; '.join(c['names'])})" if c.get("names") else "") for c in cols]


def render(r: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "single device"
    p = r["mesh"]["stage"]
    lines = [f"mesh {mesh}, preset {r['preset']}, batch {r['batch']} x seq {r['seq']}"
             f"{', sequence parallel' if r['sequence_parallel'] else ''}, remat {r['remat']}",
             "(bytes per device per execution; executions per step by phase: F forward, B "
             "backward (input gradient when split), W weight gradient, head/loss (the last "
             "stage's F), recompute, step (once, after the backward)"
             + ("; [per stage 0..p-1]" if p > 1 else "") + ")", ""]
    for mod in r["modules"]:
        lines.append(f"{mod['module']}: {mod['parallel']}")
        for prm in mod["params"]:
            lines.append(f"    param {prm['path']:<28} {str(tuple(prm['shape'])):<18} "
                         f"{prm['spec']:<32} shard {tuple(prm['shard'])}")
        lines += _colls(mod["collectives"], p)
    for title, key in (("pipeline send/recv (F: activations forward, B: gradients back)",
                        "pipeline"), ("pipeline boundary", "pipeline_boundary"),
                       ("interleaved placement", "interleaved_placement"),
                       ("FSDP weight gather", "fsdp_weight_gather"),
                       ("gradient reduction", "gradient_reduction"),
                       ("other (not in the closed forms)", "other")):
        if r[key] or key in ("pipeline", "gradient_reduction") and p > 1:
            lines += ["", f"{title}:"] + _colls(r[key], p)
    if "pipeline_schedule" in r:
        ps = r["pipeline_schedule"]
        lines += ["", f"pipeline: {ps['schedule']}, m={ps['microbatches']}, "
                  f"v={ps['virtual_stages']}, {ps['ticks']} ticks, bubble fraction "
                  f"{ps['bubble_fraction']:.3f}"]
        for s, chunks in enumerate(ps["stage_map"]):
            acts = ", ".join(f"{k.removeprefix('action_')} {v[s]}"  # "<action>/<scope>": JSON
                             for k, v in ps["actions_per_stage"].items() if v[s] and "/" not in k)
            work = ", ".join(f"{k} {v:,.0f}" for k, v in r["stages"][s]["bytes_by_source"].items()
                             if v)
            lines.append(f"  stage {s}: layers " + ", ".join(f"{a}..{b}" if b >= a else "none"
                                                            for a, b in chunks)
                         + f"; ticks per action: {acts}")
            lines.append(f"    bytes per device: {work}")
        lines += [ps["timeline"]]
    lines += ["", f"{'bytes per device per step':<36}{'measured':>12}{'analytical':>12}"
              f"{'ratio':>8}"]
    for k, v in r["bytes_by_kind"].items():
        ratio = f"{v['measured'] / v['analytical']:.2f}" if v["analytical"] else "-"
        lines.append(f"  {k:<34}{v['measured']:>12,.0f}{v['analytical']:>12,.0f}{ratio:>8}")
    model = r["model_flops"]
    phases = ", ".join(f"{k} {v / model:.3f}" for k, v in r["executed_flops_by_phase"].items() if v)
    lines.append(f"matmul FLOPs executed, all devices: {r['executed_flops']:.4g} = "
                 f"{r['executed_flops'] / model:.3f} x the model's (PaLM 6N + 12Lhs per token: "
                 f"{model:.4g}); by phase: {phases}; recompute analytical "
                 f"{r['recompute_flops_analytical'] / model:.3f}; elementwise "
                 f"{r['elementwise_flops']:.3g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_devices(args.cpu_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"  # what it explains is the emulated devices' program
    from tppjax.errors import ConfigError

    try:
        result = explain(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
