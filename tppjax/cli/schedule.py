"""Print a pipeline schedule's timeline and its simulated figures next to the closed forms.

    python scripts/schedule.py --schedule zb-h1 --stages 4 --microbatches 8
    python scripts/schedule.py --schedule interleaved --stages 4 --microbatches 8 --virtual-stages 2
    python scripts/schedule.py --schedule 1f1b --stages 4 --microbatches 8 --png 1f1b.png
    python scripts/schedule.py --schedule zb-h1 --stages 4 --microbatches 8 --json > my.json
    python scripts/schedule.py --schedule dualpipe-v --stages 4 --microbatches 8 --lockstep
    python scripts/schedule.py --schedule-file my.json   # edit my.json, check it, draw it

`--json` prints a schedule file: `scripts/train.py --schedule-file my.json` trains with it.
An action that shares the previous action's slot (dualpipe-v) is marked `+` in the timeline
and carries `"joined": true` in the JSON. `--lockstep` times one tick per slot, as the
executor runs it. --virtual-stages defaults to what the schedule needs
(`schedules.chunks_needed`: 2 for interleaved, zb-v and dualpipe-v).
"""
from __future__ import annotations

import argparse
import json
import sys

from tppjax.cli.flags import Parser, check_limits, check_outputs, schedule_conflict
from tppjax.pipeline.draw import ascii_timeline, save_png, summary, to_json
from tppjax.pipeline.schedules import (
    SCHEDULES,
    ScheduleError,
    chunks_needed,
    make_schedule,
    read_schedule_file,
)
from tppjax.pipeline.simulate import simulate
from tppjax.spmd.outputs import IMAGE_SUFFIXES, output_error

# The simulator and the drawings take seconds at the largest of these sizes; far beyond them a
# typo would run for minutes.
LIMITS = {"stages": (1, 64), "microbatches": (1, 512), "virtual_stages": (1, 8)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", help=f"one of {', '.join(SCHEDULES)} (default 1f1b, "
                        "unless --schedule-file is given)")
    parser.add_argument("--schedule-file", metavar="FILE",
                        help="a schedule from a JSON file (what --json prints), instead")
    parser.add_argument("--stages", type=int, help="p (default 4; not with --schedule-file)")
    parser.add_argument("--microbatches", type=int,
                        help="m (default 8; not with --schedule-file)")
    parser.add_argument("--virtual-stages", type=int,
                        help="v: chunks per stage (default: 2 for interleaved, zb-v and "
                             "dualpipe-v, else 1; not with --schedule-file)")
    parser.add_argument("--lockstep", action="store_true",
                        help="one tick per slot (the executor's timing), not per action")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--png", metavar="FILE", help="also draw the timeline to FILE")
    args = parser.parse_args(argv)
    sizes = {"--stages": args.stages, "--microbatches": args.microbatches,
             "--virtual-stages": args.virtual_stages}
    if args.schedule_file:  # the file holds p, m and v: a flag would be silently ignored
        if args.schedule:
            parser.error(schedule_conflict(args.schedule, args.schedule_file))
        for name, value in sizes.items():
            if value is not None:
                parser.error(f"{name} {value} conflicts with --schedule-file "
                             f"{args.schedule_file} (the file sets it); drop {name}")
    else:
        args.schedule = args.schedule or "1f1b"
        args.stages = 4 if args.stages is None else args.stages
        args.microbatches = 8 if args.microbatches is None else args.microbatches
    check_limits(parser, args, LIMITS)
    check_outputs(parser, output_error("--png", args.png, IMAGE_SUFFIXES))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    v = args.virtual_stages if args.virtual_stages is not None else chunks_needed(
        args.schedule or "")
    try:
        sim = simulate(read_schedule_file(args.schedule_file) if args.schedule_file else
                       make_schedule(args.schedule, args.stages, args.microbatches, v),
                       lockstep=args.lockstep)
        if args.png:
            save_png(sim, args.png)
    except (ScheduleError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(sim)))
    else:
        print(ascii_timeline(sim))
        print()
        print(summary(sim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
