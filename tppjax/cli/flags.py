"""What every script's command line shares: the one-line error, range checks, model flags.

The project's rule for bad input is one line, `error: ...`, naming the value and the fix, exit
code 2, no traceback, nothing written. This module imports no jax, so a script checks its flags
(and a test checks them, in-process) before the seconds that importing jax and compiling take.
"""

import argparse
import math
import os
import sys
from typing import NoReturn

MODEL_FLAGS = {  # flag → type, for the model flags that override a preset's sizes
    "vocab_size": int, "d_model": int, "layers": int, "heads": int, "kv_heads": int,
    "d_ff": int, "max_seq_len": int, "vocab_multiple": int, "style": str,
}
FIELD = {"layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads"}  # → ModelConfig
# Flag (dest) → (smallest, largest or None) accepted value, for every script that has the flag;
# checked right after parsing by `check_limits`.
LIMITS = {
    **{flag: (1, None) for flag, kind in MODEL_FLAGS.items() if kind is int},
    "cpu_devices": (1, None), "steps": (1, None), "batch_size": (1, None), "seq_len": (1, None),
    "warmup": (0, None), "microbatches": (1, None), "virtual_stages": (1, None),
    "grad_accum": (1, None), "eval_every": (0, None), "log_every": (1, None),
    "checkpoint_every": (1, None), "keep": (1, None), "num_processes": (1, None),
    "process_id": (0, None), "generate": (0, None), "max_new_tokens": (1, None), "step": (0, None),
    "seed": (0, 2**63 - 1),  # numpy's generator takes no negative seed, jax.random.key a C long
}
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each default, except where there is none to show (None, a switch that is
    off) or the help text already says it ("(default ...")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse reports a bad flag as two lines (usage, then the error); the project's rule is
    one line naming the value, exit 2, like every other bad setting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:  # argparse shows no default for a flag without help text
            if not action.help and action.default not in (None, argparse.SUPPRESS) \
                    and action.default is not False:
                action.help = "(default: %(default)s)"
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def flag(name: str) -> str:
    """`cpu_devices` → `--cpu-devices`."""
    return "--" + name.replace("_", "-")


def check_limits(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 limits: dict[str, tuple] = LIMITS) -> None:
    """Refuse numbers that would do nothing, crash later or be silently ignored (a 0 for
    `--steps`, `--cpu-devices` or a model size): `limits` maps a flag's dest to (smallest,
    largest or None); flags this script lacks and values of None (not given) are skipped. A
    list value (nargs="+") is checked item by item."""
    for name, (low, high) in limits.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and (v < low or high is not None and v > high or
                                  isinstance(v, float) and not math.isfinite(v)):
                bound = f"at least {low}" if high is None else f"between {low} and {high}"
                parser.error(f"{flag(name)} must be {bound}, got {v}")


def check_outputs(parser: argparse.ArgumentParser, *checks: str | None) -> None:
    """parser.error on the first problem that `spmd.outputs.output_error` /
    `output_dir_error` found."""
    for problem in checks:
        if problem:
            parser.error(problem)


def schedule_conflict(schedule: str, schedule_file: str) -> str:
    return (f"--schedule {schedule} conflicts with --schedule-file {schedule_file}; give one "
            "of them")


def check_run_flags(args: argparse.Namespace, cfg, seq_len: int) -> int:
    """Fill in the defaults that depend on the model (--mesh: `spmd.mesh.default_mesh`;
    --seq-len: `seq_len` or the model's max_seq_len where that is shorter), so that every
    preset runs with no flags, and refuse pipeline flags on a mesh without a `stage` axis:
    they would be silently ignored (as --stage-layers would be: the Trainer refuses it there).
    An unknown --schedule is refused on any mesh. Returns the number of stages; imports jax
    (the device count), so it runs after `configure_devices`."""
    import jax

    from tppjax.errors import ConfigError
    from tppjax.pipeline.schedules import SCHEDULES
    from tppjax.spmd.mesh import default_mesh, parse_mesh_spec

    if args.seq_len is None:
        args.seq_len = min(seq_len, cfg.max_seq_len)
    if args.mesh is None:
        args.mesh = default_mesh(cfg, jax.device_count())
    stages = parse_mesh_spec(args.mesh)["stage"]
    schedule, schedule_file = args.schedule, getattr(args, "schedule_file", None)
    if schedule and schedule_file:
        raise ConfigError(schedule_conflict(schedule, schedule_file))
    if schedule and not schedule.endswith(".json") and schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} "
                          "for --schedule")
    given = [f"{flag(k)} {getattr(args, k)}"
             for k in ("schedule", "schedule_file", "microbatches", "virtual_stages")
             if getattr(args, k, None) is not None]
    if stages == 1 and given:
        raise ConfigError(f"{given[0]} needs pipeline stages, but --mesh {args.mesh} has no "
                          f"stage axis; add stage=N to --mesh or drop {given[0].split()[0]}")
    return stages


def configure_devices(cpu_devices: int | None) -> None:
    """Must run before jax is imported: XLA reads the flag once, at backend start.

    An explicit --cpu-devices wins (and selects the CPU); otherwise an existing
    --xla_force_host_platform_device_count in XLA_FLAGS is kept, else 8 devices.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    count = "--xla_force_host_platform_device_count"
    if cpu_devices is not None:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in flags if not f.startswith(count)]
    if not any(f.startswith(count) for f in flags):
        flags.append(f"{count}={cpu_devices or 8}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--d-model, --layers, ... (each overrides the preset's) and --[no-]tie-embeddings."""
    for name, kind in MODEL_FLAGS.items():
        parser.add_argument(flag(name), type=kind, default=None,
                            help="llama or gpt2 (default: the preset's, llama)" if name == "style"
                            else "(default: the preset's)")
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="tie the output head to the embedding (default: gpt2 yes, llama no)")


def given_model_flags(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """The model flags given, in MODEL_FLAGS order: ModelConfig field → (the flag as a user
    would type it, e.g. `--heads 4` or `--no-tie-embeddings`, its value)."""
    given = {}
    for name in [*MODEL_FLAGS, "tie_embeddings"]:
        value = getattr(args, name)
        if value is not None:
            text = "--" + ("no-" if value is False else "") + name.replace("_", "-")
            text += "" if isinstance(value, bool) else f" {value}"
            given[FIELD.get(name, name)] = (text, value)
    return given


def model_config(args: argparse.Namespace, preset: str):
    """The ModelConfig of `args.preset` (default `preset`) with the model flags that were
    given; imports jax."""
    from tppjax.models import build_config

    overrides = {field: value for field, (_, value) in given_model_flags(args).items()}
    dtype = getattr(args, "dtype", "float32")
    return build_config(args.preset or preset, **overrides, compute_dtype=dtype)
