"""Plan a layout: every mesh, schedule, m, v and remat N devices can run, ranked by step time
among those that fit the memory per device.

    python scripts/plan.py --devices 8 --memory-gib 0.002 --preset tiny --seq-len 64

Memory per device is estimated by part (`tppjax.measure.plan`), the step time from each pipeline
action timed alone on this machine, the schedule's lockstep ticks and the closed-form
communication at --link-gbps. --validate checks the estimates on this machine's devices: the
memory of --validate-layouts layouts against the compiled step's `memory_analysis()`, and the
planner's pick against the best measured step of its top 5.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from tppjax.cli.flags import (
    Parser,
    add_model_flags,
    check_limits,
    check_outputs,
    configure_devices,
    model_config,
)
from tppjax.spmd.outputs import output_error


def add_plan_flags(ap: argparse.ArgumentParser) -> None:
    """--memory-gib, --link-gbps and --emulated, shared with train.py --plan auto."""
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="memory per device in GiB; layouts that need more are refused "
                         "(default: no limit)")
    ap.add_argument("--link-gbps", type=float, default=50.0,
                    help="GB/s per device for the closed-form communication of each layout")
    ap.add_argument("--emulated", action="store_true",
                    help="rank by the step on this machine's emulated CPU devices (what "
                         "--validate measures): all devices' work over the cores, and each "
                         "collective at a measured latency; default: N real devices")


def check_plan_flags(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Positive finite numbers; in train.py, no planner flag without --plan (it would do
    nothing)."""
    if getattr(args, "plan", "auto") is None and (args.memory_gib is not None or args.emulated):
        ap.error("--memory-gib and --emulated choose the layout of --plan auto; add --plan auto "
                 "or drop them")
    for name in ("memory_gib", "link_gbps"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and value != float("inf")):
            ap.error(f"--{name.replace('_', '-')} must be a finite number above 0, got {value}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    ap.add_argument("--devices", type=int, default=8, help="devices to plan for (N)")
    add_plan_flags(ap)
    ap.add_argument("--preset", default="small", help="tiny | small | base")
    add_model_flags(ap)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence (default 128, or the model's max_seq_len where "
                         "that is shorter)")
    ap.add_argument("--top", type=int, default=5, help="layouts to print")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the ranking here")
    ap.add_argument("--validate", action="store_true",
                    help="compile --validate-layouts layouts and time the top 5 on --devices "
                         "emulated CPU devices, against the estimates")
    ap.add_argument("--validate-layouts", type=int, default=10,
                    help="layouts whose memory --validate compiles")
    args = ap.parse_args(argv)
    check_limits(ap, args, {"devices": (1, None), "batch_size": (1, None),
                            "seq_len": (1, None), "top": (1, None),
                            "validate_layouts": (1, None)})
    check_limits(ap, args)
    check_plan_flags(ap, args)
    check_outputs(ap, output_error("--json", args.json))
    return args


def plan(cfg, devices: int, batch: int, seq: int, memory_gib: float | None, link_gbps: float,
         fixed: dict | None = None, emulated: bool = False
         ) -> tuple[list[dict], list[dict], list]:
    """(fitting rows fastest first, rows over the budget, refused (layout, reason))."""
    from tppjax.errors import ConfigError
    from tppjax.measure import plan as planner

    cands, refused = planner.candidates(cfg, devices, batch, seq, fixed)
    if not cands:
        given = f" with {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""
        why = f"; e.g. {refused[-1][0]}: {refused[-1][1]}" if refused else ""
        raise ConfigError(f"no layout of {devices} devices runs this model and batch{given}"
                          f"{why}")
    budget = None if memory_gib is None else memory_gib * 2**30
    emulation = {"emulated_cores": os.cpu_count(),
                 "collective_s": planner.collective_latency_s()} if emulated else {}
    fits, over = planner.rank(cfg, cands, batch, seq, budget, planner.timer(cfg, seq),
                              link_gbps, **emulation)
    if not fits:
        raise ConfigError(f"no layout fits --memory-gib {memory_gib}: the smallest, "
                          f"{over[0]['layout']}, {over[0]['why']}; raise --memory-gib")
    return fits, over, refused


def show(fits: list[dict], over: list[dict], refused: list, top: int) -> None:
    print(f"{len(fits)} layouts fit, {len(over)} need more memory, {len(refused)} refused by "
          "the run's checks")
    for i, row in enumerate(fits[:top], 1):
        print(f"{i}. {row['layout']}\n   {row['why']}")
    if len(fits) > top:
        print(f"   next: {fits[top]['layout']} ({fits[top]['step_s'] * 1e3:.2f} ms)")
    for row in over[:2]:
        print(f"over budget: {row['layout']}: {row['why']}")
    for layout, reason in refused[:2]:
        print(f"refused: {layout}: {reason}")


def validate(cfg, fits: list[dict], over: list[dict], batch: int, seq: int, layouts: int) -> dict:
    """Memory estimate against `memory_analysis()` on `layouts` layouts spread over the ranking
    (fitting and not), and the pick against the best measured of the top 5."""
    import numpy as np

    from tppjax.measure import plan as planner
    from tppjax.measure.timing import Layout, measure
    from tppjax.spmd.data import Batches, stdlib_corpus

    rows = fits + over
    chosen = [rows[round(i * (len(rows) - 1) / max(1, layouts - 1))] for i in range(layouts)]
    memory = []
    for row in {r["layout"]: r for r in chosen}.values():
        measured = planner.compiled_peak(cfg, row["candidate"], batch, seq)
        memory.append({"layout": row["layout"], "estimated": row["memory"].total,
                       "measured": measured, "ratio": row["memory"].total / measured})
        print(f"memory {row['layout']}: estimated {row['memory'].total:,} B, compiled "
              f"{measured:,} B, ratio {memory[-1]['ratio']:.3f}", file=sys.stderr)
    inputs, targets = Batches(stdlib_corpus(1 << 20), batch, seq, 0)(0)
    top = fits[:5]
    results = measure([Layout(planner.trainer(cfg, r["candidate"], batch, seq), inputs, targets)
                       for r in top], steps=5)
    timed = [{"layout": r["layout"], "predicted_s": r["step_s"], "measured_s": m["step_s"]}
             for r, m in zip(top, results, strict=True)]
    best = min(t["measured_s"] for t in timed)
    return {"memory": memory, "max_memory_error": float(np.max([abs(m["ratio"] - 1)
                                                                 for m in memory])),
            "top5": timed, "pick_over_best_measured": timed[0]["measured_s"] / best}


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_devices(args.devices if args.validate else None)
    from tppjax.measure import plan as planner

    cfg = model_config(args, "small")
    seq = args.seq_len or min(128, cfg.max_seq_len)
    fits, over, refused = plan(cfg, args.devices, args.batch_size, seq, args.memory_gib,
                               args.link_gbps, emulated=args.emulated or args.validate)
    show(fits, over, refused, args.top)
    out = {"devices": args.devices, "memory_gib": args.memory_gib, "batch_size": args.batch_size,
           "seq_len": seq, "ranked": [planner.as_json(r) for r in fits],
           "over_budget": [planner.as_json(r) for r in over],
           "refused": [{"layout": lay, "reason": why} for lay, why in refused]}
    if args.validate:
        out["validation"] = check = validate(cfg, fits, over, args.batch_size, seq,
                                             args.validate_layouts)
        print(f"memory: worst estimate {check['max_memory_error']:.1%} off the compiled "
              f"program's; pick {check['top5'][0]['layout']} measured "
              f"{check['pick_over_best_measured']:.2f}x the best of the top 5")
        for t in check["top5"]:
            print(f"  {t['layout']}: predicted {t['predicted_s'] * 1e3:.2f} ms, measured "
                  f"{t['measured_s'] * 1e3:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def run(argv=None) -> int:
    """`main`, with a bad setting as one line, exit 2."""
    from tppjax.errors import ConfigError

    try:
        return main(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())


def plan_run(args: argparse.Namespace, cfg, seq_len: int) -> None:
    """train.py --plan auto: set --mesh, --schedule, --microbatches, --virtual-stages and
    --remat to the planner's pick for this machine's devices. Those flags, when given, win: the
    pick is the fastest layout that has them (--remat none is the default, so it leaves remat
    to the planner). Flags the planner does not model are refused."""
    import jax

    from tppjax.errors import ConfigError
    from tppjax.spmd.mesh import parse_mesh_spec

    for name, given in (("--schedule-file", args.schedule_file),
                        ("--stage-layers", args.stage_layers),
                        ("--sequence-parallel", args.sequence_parallel),
                        ("--grad-accum", args.grad_accum > 1),
                        ("--init-from-hf", args.init_from_hf)):
        if given:
            raise ConfigError(f"--plan auto does not plan with {name}; drop {name} or --plan")
    fixed = {k: v for k, v in (("schedule", args.schedule), ("microbatches", args.microbatches),
                               ("virtual_stages", args.virtual_stages),
                               ("remat", None if args.remat == "none" else args.remat))
             if v is not None}
    if args.mesh:
        fixed["mesh"] = parse_mesh_spec(args.mesh)
    seq = args.seq_len or min(seq_len, cfg.max_seq_len)
    fits, _, _ = plan(cfg, jax.device_count(), args.batch_size, seq, args.memory_gib,
                      args.link_gbps, fixed, args.emulated)
    pick = fits[0]["candidate"]
    args.mesh, args.remat = pick.mesh_spec, pick.remat
    if pick.schedule != "-":
        args.schedule, args.microbatches = pick.schedule, pick.microbatches
        args.virtual_stages = pick.virtual_stages
    print(f"plan: {pick} of {len(fits)} that fit: {fits[0]['why']}")
