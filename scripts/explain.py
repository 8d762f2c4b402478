"""Explain where TP and PP act: per module, its shards and the collectives placed there.

    python scripts/explain.py --mesh data=2,stage=2,tensor=2 --preset tiny
    python scripts/explain.py --mesh data=2,tensor=4 --sequence-parallel --json

Compiles the real train step on emulated CPU devices, reads the collectives from the compiled
HLO (`spmd.hlo`), attributes each to a module (`spmd.analysis.attribute`) and sets the measured
bytes per op kind beside DESIGN section 2's closed forms (`spmd.analysis.expected`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Forward order: (module, parameter-path suffixes, how tensor splits it).
MODULES = (
    ("embedding", ("embedding",), "vocab-parallel: rows (vocab) split"),
    ("attention q/k/v", ("attn/wqkv", "attn/bqkv"), "column-parallel: kv-head groups split"),
    ("attention out", ("attn/wo", "attn/bo"), "row-parallel: heads (contracting dim) split"),
    ("MLP up/gate", ("mlp/w_in", "mlp/b_in"), "column-parallel: mlp width split"),
    ("MLP down", ("mlp/w_down", "mlp/b_down"), "row-parallel: mlp width (contracting) split"),
    ("sequence-parallel gather", (), "sequence parallelism: T all-gathered before a block input"),
    ("head", ("head/w", "head/norm"), "vocab-parallel: columns (vocab) split"),
    ("loss", (), "vocab-parallel cross-entropy: max, sum-exp, target logit reduced"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="data=2,tensor=4")
    ap.add_argument("--schedule", default="gpipe")
    ap.add_argument("--microbatches", type=int, default=None, help="default 2 x stages")
    ap.add_argument("--virtual-stages", type=int, default=1)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--remat", choices=["none", "layer", "stage"], default="none")
    ap.add_argument("--cpu-devices", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap.parse_args(argv)


def explain(args: argparse.Namespace) -> dict:
    import numpy as np

    from models import PRESETS, ConfigError
    from pipeline.run import stage_map
    from spmd import analysis
    from spmd.hlo import collectives
    from spmd.loop import parameter_table
    from spmd.mesh import make_mesh
    from spmd.rules import Rules
    from spmd.train_step import TrainConfig, Trainer

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    cfg, mesh = PRESETS[args.preset], make_mesh(args.mesh)
    p = mesh.shape["stage"]
    m = args.microbatches or (2 * p if p > 1 else 1)
    tc = TrainConfig(microbatches=m, schedule=args.schedule,
                     virtual_stages=args.virtual_stages, remat=args.remat)
    shape = (args.batch_size, args.seq_len)
    trainer = Trainer(cfg, tc, mesh, Rules(args.sequence_parallel), shape)
    params, opt_state = trainer.init(seed=0)
    inputs = trainer.place((np.zeros(shape, np.int32),) * 2)  # values do not matter here
    compiled = trainer.lower_step(params, opt_state, *inputs).compile()
    measured = collectives(compiled.as_text(), mesh)
    table = parameter_table(trainer, params)

    groups: dict[tuple, dict] = {}
    for c in measured:
        key = (analysis.attribute(c), c.op, c.bytes, c.axes)
        g = groups.setdefault(key, {"op": c.op, "bytes": c.bytes, "axes": list(c.axes),
                                    "count_fwd": 0, "count_bwd": 0, "names": []})
        g[f"count_{analysis.phase(c)}"] += c.count
        if key[0] == "other" and c.name not in g["names"]:
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
        if name == "sequence-parallel gather" and not cols:
            continue
        modules.append({"module": name, "parallel": how if mesh.shape["tensor"] > 1 else
                        "replicated (tensor=1)", "params": rows, "collectives": cols})
    exp = analysis.expected(cfg, dict(mesh.shape), *shape, m, args.schedule,
                            args.virtual_stages, args.sequence_parallel)
    meas_kind, exp_kind = analysis.by_kind(measured), analysis.by_kind(exp)
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", 0.0)
    out = {
        "mesh": dict(mesh.shape), "preset": args.preset, "batch": shape[0], "seq": shape[1],
        "sequence_parallel": args.sequence_parallel, "modules": modules,
        "pipeline": per_source.get("pipeline send/recv", []),
        "gradient_reduction": per_source.get("gradient reduction", []),
        "other": per_source.get("other", []),
        "bytes_by_kind": {k: {"measured": meas_kind.get(k, 0), "analytical": exp_kind.get(k, 0)}
                          for k in sorted(set(meas_kind) | set(exp_kind))},
        "expected": [vars(e) | {"axes": list(e.axes)} for e in exp],
        "flops_per_device_cost_analysis": flops,
        "model_flops_per_device": analysis.model_flops(cfg, *shape, args.remat != "none")
        / mesh.size,
    }
    if p > 1:
        from pipeline.draw import ascii_timeline
        from pipeline.schedules import make_schedule
        from pipeline.simulate import simulate

        sim = simulate(make_schedule(args.schedule, p, m, args.virtual_stages))
        out["pipeline_schedule"] = {
            "schedule": args.schedule, "microbatches": m, "virtual_stages": args.virtual_stages,
            "bubble_fraction": sim.bubble_fraction, "timeline": ascii_timeline(sim),
            "stage_map": [[[r.start, r.stop - 1] for r in chunks]
                          for chunks in stage_map(cfg.n_layers, p, args.virtual_stages)]}
    return out


def _colls(cols: list[dict], indent: str = "    ") -> list[str]:
    if not cols:
        return [f"{indent}no collective"]
    return [f"{indent}{c['op']:<19}{c['bytes']:>10,} B  over {','.join(c['axes']):<13}"
            f"fwd x{c['count_fwd']:<4} bwd x{c['count_bwd']}"
            + (f"  ({'; '.join(c['names'])})" if c.get("names") else "") for c in cols]


def render(r: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "single device"
    lines = [f"mesh {mesh}, preset {r['preset']}, batch {r['batch']} x seq {r['seq']}"
             f"{', sequence parallel' if r['sequence_parallel'] else ''}"
             "  (bytes per device per execution; counts per step as compiled: an op in a "
             "loop counts each trip, in a cond branch on every trip)", ""]
    for mod in r["modules"]:
        lines.append(f"{mod['module']}: {mod['parallel']}")
        for p in mod["params"]:
            lines.append(f"    param {p['path']:<28} {str(tuple(p['shape'])):<18} "
                         f"{p['spec']:<32} shard {tuple(p['shard'])}")
        lines += _colls(mod["collectives"])
    for title, key in (("pipeline send/recv", "pipeline"), ("gradient reduction",
                       "gradient_reduction"), ("other (not in DESIGN's closed forms)", "other")):
        if r[key] or key != "other":
            lines += ["", f"{title}:"] + _colls(r[key])
    if "pipeline_schedule" in r:
        ps = r["pipeline_schedule"]
        lines += ["", f"pipeline: {ps['schedule']}, m={ps['microbatches']}, "
                  f"v={ps['virtual_stages']}, bubble fraction {ps['bubble_fraction']:.3f}"]
        for s, chunks in enumerate(ps["stage_map"]):
            lines.append(f"  stage {s}: layers " + ", ".join(f"{a}..{b}" for a, b in chunks))
        lines += [ps["timeline"]]
    lines += ["", f"{'bytes per device per step':<27}{'measured':>12}{'analytical':>12}"
              f"{'ratio':>8}"]
    for k, v in r["bytes_by_kind"].items():
        ratio = f"{v['measured'] / v['analytical']:.2f}" if v["analytical"] else "-"
        lines.append(f"  {k:<25}{v['measured']:>12,}{v['analytical']:>12,}{ratio:>8}")
    lines.append(f"FLOPs per device: cost_analysis {r['flops_per_device_cost_analysis']:.3g} "
                 f"(loop bodies counted once), model (PaLM 6N+12Lhs per token) "
                 f"{r['model_flops_per_device']:.3g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    from models import ConfigError

    try:
        result = explain(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
