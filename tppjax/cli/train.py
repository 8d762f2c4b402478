"""Train a Transformer with data, tensor and pipeline parallelism on a named mesh.

With no arguments: a small byte-level model on the Python standard library's sources, on 8
emulated CPU devices, mesh data=2 x tensor=4. Same seed + same data ⇒ the same loss curve on
every mesh. Bad settings print one line and exit with code 2.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import NoReturn

from tppjax.cli import flags as cli
from tppjax.cli.flags import Parser, add_model_flags, check_limits, given_model_flags
from tppjax.cli.flags import check_run_flags as _check_run_flags
from tppjax.cli.plan import add_plan_flags, check_plan_flags, plan_run

SEQ_LEN = 128  # without --seq-len: this, or the model's max_seq_len where that is shorter


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default=None,
                   help="axis sizes over data, fsdp, stage, context, tensor (default: tensor = the "
                        "largest of 4, 2, 1 that divides the heads, kv heads and devices, the "
                        "rest data: data=2,tensor=4 for small on 8 devices)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="emulate N CPU devices and run on them (default: an accelerator where "
                        "there is one, else 8 CPU devices unless XLA_FLAGS sets a count)")
    p.add_argument("--data", default=None,
                   help="text file, folder of text, or uint16 .bin (default: stdlib sources)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default {SEQ_LEN}, or the model's max_seq_len "
                        "where that is shorter)")
    p.add_argument("--preset", default=None,
                   help="tiny | small | base: the model's size (default small)")
    p.add_argument("--init-from-hf", default=None, metavar="DIR",
                   help="fine-tune a Hugging Face Llama/GPT-2 folder (its config sets the model)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenize text --data with DIR/tokenizer.json instead of bytes")
    add_model_flags(p)
    p.add_argument("--seed", type=int, default=None,
                   help="init and data order (default 0; on --resume the saved run's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; weights and optimizer state stay float32")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--microbatches", type=int, default=None,
                   help="pipeline micro-batches per step (default: 2 x stages)")
    p.add_argument("--schedule", default=None, help="pipeline schedule (stage > 1; default gpipe)")
    p.add_argument("--schedule-file", default=None, metavar="FILE",
                   help="pipeline schedule from a JSON file, as `scripts/schedule.py --json` "
                        "prints it; micro-batches and virtual stages default to the file's")
    p.add_argument("--virtual-stages", type=int, default=None, help="chunks per stage (default 1)")
    p.add_argument("--stage-layers", default=None, metavar="N,N,...|auto",
                   help="layers per virtual stage, in model order (e.g. 1,2,2,1), or auto: "
                        "balanced by cost, the head counted on the last (default: even when "
                        "the layers divide, else auto)")
    p.add_argument("--remat", choices=["none", "layer", "stage"], default="none",
                   help="recompute activations in the backward pass")
    p.add_argument("--plan", choices=["auto"], default=None,
                   help="auto: mesh, schedule, micro-batches, virtual stages and remat from "
                        "scripts/plan.py's pick for these devices (those flags, when given, "
                        "bind the pick; --remat none leaves remat to it)")
    add_plan_flags(p)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each step's batch into K sequential chunks, one update")
    p.add_argument("--eval-every", type=int, default=50,
                   help="held-out loss every N steps and at the last (0: never)")
    p.add_argument("--metrics", default=None,
                   help="write one JSON object per step here (a new file; --resume appends)")
    p.add_argument("--log-every", type=int, default=10,
                   help="progress line every N steps when not on a terminal")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the train and eval loss curves here at the end (matplotlib)")
    p.add_argument("--profile-dir", default=None,
                   help="write a jax.profiler trace of the 3 steps after this run's first "
                        "(which compiles) here")
    p.add_argument("--checkpoint-dir", default=None, help="save checkpoints here (orbax)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps")
    p.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints already in --checkpoint-dir (and replace an "
                        "existing --metrics file) and start afresh")
    from tppjax.spmd.distributed import add_flags

    add_flags(p)
    args = p.parse_args(argv)
    check_limits(p, args)
    check_plan_flags(p, args)
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number above 0, got {args.lr}")
    return args


def check_run_flags(args: argparse.Namespace, cfg) -> int:
    """`tppjax.cli.flags.check_run_flags` with this script's --seq-len default."""
    return _check_run_flags(args, cfg, SEQ_LEN)


def build(args: argparse.Namespace):
    from tppjax.pipeline.layout import parse_stage_layers
    from tppjax.spmd.data import byte_tokens, check_split, check_vocab, load_tokens, split_heldout
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.rules import Rules
    from tppjax.spmd.train_step import TrainConfig, Trainer

    if args.init_from_hf:
        from tppjax.spmd.hf import fine_tune_config

        cfg = fine_tune_config(args.init_from_hf, given_model_flags(args), preset=args.preset,
                               seq_len=args.seq_len, compute_dtype=args.dtype)
    else:
        cfg = cli.model_config(args, "small")
    if args.plan:
        plan_run(args, cfg, SEQ_LEN)
    stages = check_run_flags(args, cfg)
    mesh = make_mesh(args.mesh)
    schedule, m, v = args.schedule or "gpipe", 2 * stages if stages > 1 else 1, 1
    if args.schedule_file:
        from tppjax.pipeline.schedules import read_schedule_file

        sched = read_schedule_file(args.schedule_file)
        schedule, m, v = args.schedule_file, sched.microbatches, sched.virtual_stages
    tc = TrainConfig(
        steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
        microbatches=args.microbatches or m, schedule=schedule,
        virtual_stages=args.virtual_stages or v, remat=args.remat,
        stage_layers=parse_stage_layers(args.stage_layers),
        grad_accum=args.grad_accum,
    )
    encode = byte_tokens
    if args.tokenizer:
        from tppjax.models.hf import load_tokenizer

        encode = load_tokenizer(args.tokenizer)
    tokens = load_tokens(args.data, encode)
    source = "the default corpus" if args.data is None else f"--data {args.data}"
    check_vocab(tokens, cfg.vocab_size, source)
    check_split(tokens, args.seq_len, args.eval_every > 0, source)
    trainer = Trainer(cfg, tc, mesh, Rules(args.sequence_parallel), (args.batch_size, args.seq_len))
    return trainer, split_heldout(tokens)


def print_layout(trainer, params) -> None:
    from tppjax.spmd.loop import parameter_table
    from tppjax.spmd.mesh import describe

    rows = parameter_table(trainer, params)
    count = trainer.parameter_count()
    print(f"mesh: {describe(trainer.mesh)}")
    print(f"parameters: {count:,}  ({trainer.cfg.style} style, {trainer.cfg.n_layers} layers)")
    width = max(len(r[0]) for r in rows)
    for path, shape, logical, spec, shard in rows:
        print(f"  {path:<{width}}  {str(shape):<16} {str(logical):<34} {spec:<30} shard {shard}")
    if trainer.stages > 1:
        from tppjax.spmd.pipelined import describe_pipeline

        print(describe_pipeline(trainer))


def initial_state(args, trainer, seed: int):
    """Fresh (params, opt_state): --init-from-hf DIR's weights, else drawn from `seed`."""
    if args.init_from_hf:
        from tppjax.spmd.hf import init_state

        params, opt_state, loaded = init_state(args.init_from_hf, trainer)
        print(f"loaded {loaded} from {args.init_from_hf}")
        return params, opt_state
    return trainer.init(seed)


def open_checkpoints(args, trainer):
    """(manager or None, params, opt_state, first step): fresh, or restored from the latest
    checkpoint (`spmd.resume`); sets args.seed to the run's."""
    from tppjax.models.hf import tokenizer_file
    from tppjax.spmd.resume import start_run

    tokenizer = tokenizer_file(args.tokenizer).read_text() if args.tokenizer else None
    start = start_run(trainer, lambda seed: initial_state(args, trainer, seed),
                      args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                      seed=args.seed, keep=args.keep, mesh_spec=args.mesh, tokenizer=tokenizer,
                      note=print)
    args.seed = start.seed
    return start.manager, start.params, start.opt_state, start.step


def summary(records: list[dict], wall_s: float, args, manager) -> str:
    """The run's last line: its steps, wall time, final losses and the files it wrote."""
    last = records[-1]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    losses = f"final loss {last['loss']:.4f}" + (f", eval loss {evals[-1]:.4f}" if evals else "")
    files = [f"metrics {args.metrics}"] if args.metrics else []
    if manager and manager.latest_step() is not None:
        files.append(f"checkpoint {manager.path(manager.latest_step())}")
    files += [f"plot {args.plot}"] if args.plot else []
    files += [f"profile {args.profile_dir}"] if args.profile_dir else []
    return (f"done: steps {records[0]['step']}..{last['step']} in {wall_s:.1f} s; {losses}; "
            + ("wrote " + ", ".join(files) if files else "no files written"))


def exit_on_sigterm(signum, frame) -> NoReturn:
    """SIGTERM (a scheduler's preemption, `kill`) ends the run as Ctrl-C does, through the
    `finally`s: a save in flight completes and the checkpoint lock is released, so the requeued
    job's --resume finds the folder free. Python's default would exit without them."""
    sys.exit(128 + signum)


def main(argv=None) -> int:
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv=None) -> int:
    began = time.perf_counter()
    args = parse_args(argv)
    cli.configure_devices(args.cpu_devices)  # before jax is imported
    from tppjax.errors import ConfigError
    from tppjax.spmd.loop import LoopConfig, train
    from tppjax.spmd.outputs import check_run_outputs, continue_metrics
    from tppjax.spmd.progress import Profile, Progress

    manager = profile = None
    try:
        from tppjax.spmd import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        primary = distributed.is_primary()
        if not primary:  # only process 0 prints progress (errors still go to stderr)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        check_run_outputs(args.metrics, args.plot, args.profile_dir, resume=args.resume,
                          overwrite=args.overwrite, primary=primary)
        if args.plot and primary:
            from tppjax.cli.plot import check_matplotlib

            check_matplotlib()  # now, not after the whole run
        trainer, (train_tokens, heldout_tokens) = build(args)
        manager, params, opt_state, start = open_checkpoints(args, trainer)  # sets args.seed
        lc = LoopConfig(args.batch_size, args.seq_len, args.seed, args.eval_every)
        print_layout(trainer, params)
        metrics_file = None
        if args.metrics and primary:
            if args.resume and (dropped := continue_metrics(args.metrics, start)):
                print(f"--metrics {args.metrics}: dropped {dropped} lines of steps {start} and "
                      "later (they are trained again)")
            metrics_file = open(args.metrics, "a" if args.resume else "w")  # noqa: SIM115
        steps = trainer.tc.steps
        progress, profile = Progress(steps, args.log_every), Profile(args.profile_dir, start)
        records = []
        for record, (params, opt_state) in train(trainer, lc, train_tokens, heldout_tokens,
                                                 params, opt_state, start):
            step = record["step"]
            records.append(record)
            profile.after(step, step == steps - 1)
            save = manager and ((step + 1) % args.checkpoint_every == 0 or step == steps - 1)
            if save:
                manager.save(step, *trainer.to_canonical(params, opt_state))
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            progress.show(record)
            if save:
                progress.note(f"saving checkpoint {manager.path(step)}")
        profile.close()
        if metrics_file:
            metrics_file.close()
        if args.plot and primary:
            from tppjax.cli.plot import plot, read_metrics

            # A resumed run's metrics file holds the earlier steps too.
            plot(read_metrics(args.metrics) if args.metrics else records, args.plot)
            print(f"loss curves written to {args.plot}")
        if manager:
            manager.wait()  # the summary names committed checkpoints only
        print(summary(records, time.perf_counter() - began, args, manager))
    except (ConfigError, FloatingPointError) as err:
        if isinstance(err, FloatingPointError) and manager:
            manager.wait()  # a save still in flight is a good checkpoint too
            if manager.latest_step() is not None:
                err = f"{err}; the last good checkpoint is step {manager.latest_step()}"
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if profile:
            profile.close()
        if manager:
            manager.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
