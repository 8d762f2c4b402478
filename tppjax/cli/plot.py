"""Draw the train and eval loss curves of a run from its metrics file (one JSON object a line).

    python scripts/plot.py METRICS.jsonl --out loss.png

Needs matplotlib (the `plot` extra: pip install -e '.[plot]'); without it, one line and exit 2.
"""

import argparse
import json
import sys
from pathlib import Path

from tppjax.cli.flags import Parser, check_outputs
from tppjax.errors import ConfigError
from tppjax.spmd.outputs import IMAGE_SUFFIXES, output_error

MISSING = "plotting needs matplotlib, which is not installed: pip install matplotlib"


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ConfigError(MISSING) from err


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; each must be a JSON object with an integer `step` (the
    x axis), else the plot would be empty or wrong rather than refused."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read metrics {path}: {err}; give a metrics file that "
                          "scripts/train.py wrote") from None
    for n, r in enumerate(records, 1):
        step = r.get("step") if isinstance(r, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"metrics {path}: record {n} has no integer 'step' ({str(r)[:60]}); "
                              "give a metrics file that scripts/train.py wrote")
    return records


def plot(records: list[dict], out: str | Path) -> None:
    """Train loss at every step, eval loss where it was measured; steps counted from 1."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if not any("loss" in r for r in records):
        raise ConfigError("the metrics hold no loss to plot")
    # A run resumed from an earlier checkpoint re-logs steps: keep the last record of each.
    by_step = {r["step"]: r for r in records if "step" in r}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [s for s in steps if "loss" in by_step[s]]
    ax.plot([s + 1 for s in train], [by_step[s]["loss"] for s in train], label="train", lw=1)
    evals = [s for s in steps if "eval_loss" in by_step[s]]
    if evals:
        ax.plot([s + 1 for s in evals], [by_step[s]["eval_loss"] for s in evals], "o-",
                label="eval (held out)", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err}") from err
    finally:
        plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="the --metrics file of scripts/train.py")
    p.add_argument("--out", default="loss.png", help="image file")
    args = p.parse_args(argv)
    check_outputs(p, output_error("--out", args.out, IMAGE_SUFFIXES))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plot(read_metrics(args.metrics), args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"loss curves written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
