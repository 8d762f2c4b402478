"""Benchmark layouts against one device on the same global batch, in one run.

    python scripts/bench.py --layouts "data=2,stage=2,tensor=2" "stage=4,tensor=2" --microbatches 4 16

Prints a markdown table (ratios to the single-device step) and, with --json FILE, the raw numbers.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["data=8", "tensor=8", "data=2,tensor=4",
                                                     "data=2,stage=2,tensor=2"])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4])
    ap.add_argument("--schedule", default="gpipe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--cpu-devices", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")

    import jax

    from models import PRESETS
    from spmd.data import Batches, stdlib_corpus
    from spmd.measure import measure
    from spmd.mesh import make_mesh
    from spmd.rules import Rules
    from spmd.train_step import TrainConfig, Trainer

    cfg = PRESETS[args.preset]
    inputs, targets = Batches(stdlib_corpus(1 << 20), args.batch_size, args.seq_len, 0)(0)
    shape = (args.batch_size, args.seq_len)
    runs = [("single", 1)] + [(lay, m) for lay in args.layouts
                              for m in (args.microbatches if "stage" in lay else [1])]
    rows = []
    for layout, m in runs:
        devices = jax.devices()[:1] if layout == "single" else None
        mesh = make_mesh("data=1" if layout == "single" else layout, devices)
        tc = TrainConfig(microbatches=m, schedule=args.schedule, remat=args.remat)
        result = measure(Trainer(cfg, tc, mesh, Rules(), shape), inputs, targets, args.steps)
        rows.append({"layout": layout, "microbatches": m, **result})
        print(f"measured {layout} m={m}: {result['step_s']:.3f} s/step", file=sys.stderr)
    base = rows[0]
    print("| layout | m | compile s | step s | step / 1 device | temp MiB/device | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        print(f"| {r['layout']} | {r['microbatches']} | {r['compile_s']:.2f} | {r['step_s']:.3f} | "
              f"{r['step_time_ratio']:.2f} | {r['temp_bytes_per_device'] / 2**20:.1f} | "
              f"{r['loss']:.5f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
