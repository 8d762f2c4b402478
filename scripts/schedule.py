"""Print a pipeline schedule's timeline and its simulated figures next to the closed forms.

    python scripts/schedule.py --schedule zb-h1 --stages 4 --microbatches 8
    python scripts/schedule.py --schedule interleaved --stages 4 --microbatches 8 --virtual-stages 2
    python scripts/schedule.py --schedule 1f1b --stages 4 --microbatches 8 --png 1f1b.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.draw import ascii_timeline, save_png, summary, to_json  # noqa: E402
from pipeline.schedules import SCHEDULES, ScheduleError, make_schedule  # noqa: E402
from pipeline.simulate import simulate  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", required=True, help=f"one of {', '.join(SCHEDULES)}")
    parser.add_argument("--stages", type=int, required=True, help="p")
    parser.add_argument("--microbatches", type=int, required=True, help="m")
    parser.add_argument("--virtual-stages", type=int, default=1, help="v (interleaved)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--png", metavar="FILE", help="also draw the timeline to FILE")
    args = parser.parse_args(argv)
    try:
        sim = simulate(make_schedule(args.schedule, args.stages, args.microbatches,
                                     args.virtual_stages))
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
