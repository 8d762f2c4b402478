"""Benchmark layouts against one device on the same global batch, in one run.

    python scripts/bench.py --steps 2 --microbatches 4 8 --json bench.json --png bench.png

A layout is a mesh spec, optionally `:schedule` and `+sp` (sequence parallelism), e.g.
`data=2,stage=2,tensor=2:1f1b` or `data=2,tensor=4+sp`. Every layout is compiled first, then
their steps are timed in turns (`tppjax.measure.timing.measure`). Prints a markdown table of ratios
(step time; CPU time, which is the emulated devices' total work without their waits at
collectives; communicated bytes against docs/design.md §2's closed forms; FLOPs against one
device) and the step time that p real devices would take (`predicted_step_s`: the simulator's
makespan with each action's cost timed alone; `predicted_lockstep_s`: the same costs through
this executor's lockstep ticks; see BENCHMARKS.md), and, with --json FILE, every
number; --png FILE plots peak memory and compile time against the micro-batch count for the
pipeline layouts (needs matplotlib).
"""

import argparse
import dataclasses
import functools
import json
import math
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
from tppjax.spmd.outputs import IMAGE_SUFFIXES, output_error

LAYOUTS = ["data=8", "tensor=8", "fsdp=2,tensor=4", "data=2,tensor=4", "data=2,tensor=4+sp",
           "data=2,stage=2,tensor=2:gpipe", "data=2,stage=2,tensor=2:1f1b",
           "data=2,stage=2,tensor=2:zb-h1", "data=2,stage=2,tensor=2:interleaved",
           "data=2,stage=2,tensor=2:1f1b+sp", "stage=4,tensor=2:gpipe", "stage=4,tensor=2:1f1b",
           "stage=4,tensor=2:zb-h1"]  # interleaved on stage=4: --layers 8 (small has 4)


LAYOUT_SYNTAX = ("MESH[:SCHEDULE][+sp]: MESH as for train.py's --mesh (e.g. "
                 "data=2,stage=2,tensor=2), SCHEDULE a pipeline schedule (stage > 1; default "
                 "gpipe), +sp sequence parallelism; e.g. data=2,stage=2,tensor=2:1f1b or "
                 "data=2,tensor=4+sp")


def parse_layout(text: str) -> tuple[str, str, bool]:
    """`mesh[:schedule][+sp]` → (mesh, schedule, sequence_parallel)."""
    sp = text.endswith("+sp")
    text = text.removesuffix("+sp")
    mesh, _, schedule = text.partition(":")
    return mesh, schedule or "gpipe", sp


def check_layout(text: str, devices: int) -> None:
    """Refuse a layout that would fail later or be read as another one (an empty mesh is one
    device; a schedule on a mesh without stages would be ignored): ConfigError naming it and
    the syntax. Needs jax (spmd.mesh imports it)."""
    from tppjax.errors import ConfigError
    from tppjax.pipeline.schedules import SCHEDULES
    from tppjax.spmd.mesh import parse_mesh_spec

    mesh, schedule, _ = parse_layout(text)
    problem = None
    if not mesh.strip():
        problem = "no mesh"
    elif schedule not in SCHEDULES:
        problem = f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}"
    else:
        sizes = parse_mesh_spec(mesh)
        if ":" in text and sizes["stage"] == 1:
            problem = f"schedule {schedule} needs stage > 1 in the mesh"
        elif math.prod(sizes.values()) != devices:
            problem = (f"the mesh needs {math.prod(sizes.values())} devices, not {devices} "
                       "(or change --cpu-devices)")
    if problem:
        raise ConfigError(f"--layouts {text!r}: {problem}; layouts are MESH[:SCHEDULE][+sp], "
                          "e.g. data=2,stage=2,tensor=2:1f1b or data=2,tensor=4+sp")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_comp) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["layout"] for r in rows if "stage" in r["layout"]):
        pts = sorted((r["microbatches"], r) for r in rows if r["layout"] == name)
        ms = [m for m, _ in pts]
        ax_mem.plot(ms, [r["peak_bytes_per_device"] / 2**20 for _, r in pts], "o-", label=name)
        ax_comp.plot(ms, [r["compile_s"] for _, r in pts], "o-", label=name)
    for ax, what in ((ax_mem, "peak MiB per device"), (ax_comp, "compile s")):
        ax.set_xlabel("micro-batches m")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, metavar="LAYOUT",
                    help=LAYOUT_SYNTAX)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4],
                    help="micro-batch counts to run each pipeline layout with")
    ap.add_argument("--preset", default="small", help="tiny | small | base")
    add_model_flags(ap)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence (default 128, or the model's max_seq_len where "
                         "that is shorter)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    ap.add_argument("--remat", choices=["none", "layer", "stage"], default="none",
                    help="recompute activations in the backward pass")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="emulated CPU devices (default 8 unless XLA_FLAGS sets a count)")
    ap.add_argument("--generate", type=int, default=256, metavar="N",
                    help="also time greedy generation of N new tokens on one device, with and "
                         "without the KV cache (0: skip)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    ap.add_argument("--png", default=None, metavar="FILE",
                    help="plot peak memory and compile time against m here (matplotlib)")
    args = ap.parse_args(argv)
    check_limits(ap, args)
    check_outputs(ap, output_error("--json", args.json),
                  output_error("--png", args.png, IMAGE_SUFFIXES))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_devices(args.cpu_devices)

    import jax

    from tppjax.measure import analysis
    from tppjax.measure.timing import (
        Layout,
        measure,
        predict_lockstep_s,
        predict_step_s,
        time_actions,
    )
    from tppjax.pipeline.schedules import chunks_needed, make_schedule
    from tppjax.pipeline.simulate import simulate
    from tppjax.spmd.data import Batches, stdlib_corpus
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.rules import Rules, batch_shards
    from tppjax.spmd.train_step import TrainConfig, Trainer

    cfg = model_config(args, "small")
    args.seq_len = args.seq_len or min(128, cfg.max_seq_len)
    for layout in args.layouts:  # all of them before the first one is measured
        check_layout(layout, jax.device_count())
    inputs, targets = Batches(stdlib_corpus(1 << 20), args.batch_size, args.seq_len, 0)(0)
    shape = (args.batch_size, args.seq_len)
    runs = [("single", 1)] + [(lay, m) for lay in args.layouts
                              for m in (args.microbatches if "stage" in lay else [1])]
    model_flops = analysis.model_flops(cfg, *shape)
    # Each action timed alone on one device: (layers, micro-batch rows, split) → {F, B[, W]} s.
    action_s = functools.cache(lambda layers, b_mb, split: time_actions(
        cfg, layers, b_mb, args.seq_len, args.remat, split))

    def predict(layout, sizes, schedule, m, v, layers) -> dict:
        """Predicted step on real devices: one device's F+B of all layers (single), or the
        simulated makespan of the schedule and the executor's lockstep ticks (pipelines); for
        uneven stages (`layers` per virtual stage) the lockstep ticks only, each action costed
        for its own virtual stage's layers (the simulator takes one cost per action kind);
        None for other layouts."""
        rows_per_mb = args.batch_size // batch_shards(sizes) // m
        p = sizes["stage"]
        if layout == "single":
            costs = action_s(cfg.n_layers, args.batch_size, False)
            return {"action_layers": cfg.n_layers, "action_rows": args.batch_size,
                    "action_s": costs, "predicted_step_s": costs["F"] + costs["B"],
                    "predicted_lockstep_s": costs["F"] + costs["B"]}
        if p == 1:
            return {"action_layers": None, "action_rows": None, "action_s": None,
                    "predicted_step_s": None, "predicted_lockstep_s": None}
        sched = make_schedule(schedule, p, m, v)
        if layers:
            costs = {n: action_s(n, rows_per_mb, sched.split_backward) for n in set(layers) if n}
            return {"action_layers": max(layers), "action_rows": rows_per_mb,
                    "action_s": costs[max(layers)], "predicted_step_s": None,
                    "predicted_lockstep_s": predict_lockstep_s(schedule, p, m, v, costs, layers)}
        layers = cfg.n_layers // (p * v)
        costs = action_s(layers, rows_per_mb, sched.split_backward)
        return {"action_layers": layers, "action_rows": rows_per_mb, "action_s": costs,
                "predicted_step_s": predict_step_s(sched, costs),
                "predicted_lockstep_s": predict_lockstep_s(schedule, p, m, v, costs)}

    def trainer(layout, m):
        spec, schedule, sp = parse_layout("data=1" if layout == "single" else layout)
        mesh = make_mesh(spec, jax.devices()[:1] if layout == "single" else None)
        v = chunks_needed(schedule)
        tc = TrainConfig(microbatches=m, schedule=schedule, virtual_stages=v, remat=args.remat)
        return Trainer(cfg, tc, mesh, Rules(sp), shape)

    # Every layout is checked (a Trainer compiles nothing) before the first one is measured.
    trainers = [trainer(layout, m) for layout, m in runs]
    results = measure([Layout(tr, inputs, targets) for tr in trainers], args.steps)
    rows = []
    for (layout, m), tr, result in zip(runs, trainers, results, strict=True):
        mesh, sp = tr.mesh, tr.rules.sequence_parallel
        schedule, v = tr.tc.schedule, tr.tc.virtual_stages
        p = mesh.shape["stage"]
        layers = tr.layout.counts if tr.padded else None  # uneven stages: per virtual stage
        expected = analysis.expected(cfg, dict(mesh.shape), *shape, m, schedule, v, sp,
                                     args.remat, layers)
        comm = sum(c["bytes"] for c in result["collectives"].values())
        want = sum(e.total_bytes for e in expected)
        bubble = simulate(make_schedule(schedule, p, m, v)).bubble_fraction if p > 1 else 0.0
        predicted = predict(layout, mesh.shape, schedule, m, v, layers)
        rows.append({"layout": layout, "schedule": schedule if p > 1 else "-",
                     "microbatches": m, "virtual_stages": v, "sequence_parallel": sp,
                     "devices": mesh.size, **result, "comm_bytes": comm,
                     "comm_bytes_analytical": want, "bubble_fraction": bubble,
                     "model_flops": model_flops,
                     "recompute_flops_analytical": analysis.recompute_flops(
                         cfg, *shape, args.remat, p, v, layers), **predicted})
        print(f"measured {layout} m={m}: {result['step_s']:.3f} s/step, "
              f"compile {result['compile_s']:.1f} s", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        r["cpu_time_ratio"] = r["cpu_s"] / base["cpu_s"]
        r["predicted_ratio"] = r["predicted_step_s"] / base["predicted_step_s"] \
            if r["predicted_step_s"] else None
        r["comm_bytes_ratio"] = r["comm_bytes"] / r["comm_bytes_analytical"] \
            if r["comm_bytes_analytical"] else None
        # All devices' compiled FLOPs over one device's (cost_analysis of the same step: it
        # counts a loop body once, so this says little; executed_flops_ratio is the truth).
        r["flops_ratio"] = r["flops_per_device"] * r["devices"] / base["flops_per_device"]
        # Matmul FLOPs the step executes (loops and schedule tables counted), all devices, over
        # the model's 6N + 12Lhs per token; the excess is recomputation, by name.
        r["executed_flops_ratio"] = r["executed_flops"] / model_flops
        r["recompute_flops_ratio"] = r["executed_flops_by_phase"]["recompute"] / model_flops
    print("| layout | schedule | m | step / 1 device | CPU time / 1 device | predicted / 1 device "
          "| comm / closed form "
          "| executed FLOPs / model | recompute / model | peak MiB/device | compile s | tokens/s "
          "| bubble | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        comm = f"{r['comm_bytes_ratio']:.2f}" if r["comm_bytes_ratio"] else "-"
        pred = f"{r['predicted_ratio']:.2f}" if r["predicted_ratio"] else "-"
        name = parse_layout(r["layout"])[0] + ("+sp" if r["sequence_parallel"] else "")
        print(f"| {name} | {r['schedule']} | {r['microbatches']} | "
              f"{r['step_time_ratio']:.2f} | {r['cpu_time_ratio']:.2f} | {pred} | {comm} | "
              f"{r['executed_flops_ratio']:.3f} | "
              f"{r['recompute_flops_ratio']:.3f} | {r['peak_bytes_per_device'] / 2**20:.1f} | "
              f"{r['compile_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['bubble_fraction']:.2f} | "
              f"{r['loss']:.5f} |")
    print(f"\nmodel FLOPs per step (PaLM 6N+12Lhs per token): {model_flops:.3g}; one device "
          f"executes {base['executed_flops']:.3g} (XLA's cost_analysis, loop bodies once: "
          f"{base['flops_per_device']:.3g})")
    for r in rows:
        if r["action_s"]:
            print(f"{r['layout']} m={r['microbatches']}: {r['action_layers']} layers x "
                  f"{r['action_rows']} rows, " + ", ".join(
                      f"{k} {s * 1e3:.2f} ms" for k, s in r["action_s"].items())
                  + (f"; predicted {r['predicted_step_s'] * 1e3:.1f} ms (schedule), "
                     if r["predicted_step_s"] else "; predicted ")
                  + f"{r['predicted_lockstep_s'] * 1e3:.1f} ms (this executor, lockstep ticks), "
                  f"measured {r['step_s'] * 1e3:.1f} ms")
    out = {"results": rows}
    if args.generate:
        from tppjax.spmd.sampling import generation_speed

        prompt = 16
        gen_cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len,
                                                           prompt + args.generate))
        trainer = Trainer(gen_cfg, TrainConfig(), make_mesh("data=1", jax.devices()[:1]),
                          Rules(), (1, prompt + args.generate))
        out["generation"] = {"new_tokens": args.generate, "prompt_tokens": prompt, **(
            speed := generation_speed(trainer, trainer.init(seed=0)[0], prompt, args.generate))}
        print(f"\ngreedy generation, one device, {args.generate} new tokens after {prompt}: "
              f"{speed['cached_tokens_per_s']:,.0f} tokens/s with the KV cache, "
              f"{speed['uncached_tokens_per_s']:,.0f} without "
              f"({speed['cached_tokens_per_s'] / speed['uncached_tokens_per_s']:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        try:
            plot(rows, args.png)
        except ImportError:
            print("--png needs matplotlib; skipped", file=sys.stderr)
    return 0


def run(argv=None) -> int:
    """`main`, with a bad setting (a layout the model or batch does not fit) as one line."""
    from tppjax.errors import ConfigError

    try:
        return main(argv)
    except ConfigError as err:  # shared checks say --mesh; here each layout's mesh is --layouts
        print(f"error: {str(err).replace('--mesh', '--layouts')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
