"""Bad inputs to scripts/train.py: one line `error: ...` naming the value and the fix, exit code
2, no traceback, and nothing written or deleted. Every case fails before anything compiles."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tppjax.cli.train import parse_args
from tppjax.spmd.loop import LoopConfig, train

ROOT = Path(__file__).resolve().parents[1]
# Valid apart from the case's flags (and --data {d}/ok.txt where a case gives none: 1000 tokens,
# enough for --seq-len 32 with a held-out part).
BASE = ["--cpu-devices", "8", "--preset", "tiny", "--mesh", "data=8", "--steps", "1",
        "--seq-len", "32", "--vocab-size", "256", "--metrics", "{d}/new.jsonl"]
OK = ["--data", "{d}/ok.txt"]
PP = ["--mesh", "stage=2,data=4"]  # pipeline flags need a stage axis


@pytest.mark.parametrize("args,expect", [
    (["--steps", "-1"], "--steps must be at least 1, got -1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number above 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number above 0, got -1.0"),
    (["--lr", "0"], "--lr must be a finite number above 0, got 0.0"),
    (["--cpu-devices", "0"], "--cpu-devices must be at least 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["--microbatches", "0"], "--microbatches must be at least 1, got 0"),
    (["--virtual-stages", "0"], "--virtual-stages must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--eval-every", "-1"], "--eval-every must be at least 0, got -1"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--keep", "0"], "--keep must be at least 1, got 0"),
    (["--layers", "0"], "--layers must be at least 1, got 0"),
    (["--d-model", "0"], "--d-model must be at least 1, got 0"),
    (["--heads", "-2"], "--heads must be at least 1, got -2"),
    (["--vocab-size", "0"], "--vocab-size must be at least 1, got 0"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be between 0 and 9223372036854775807, got -1"),
    (["--num-processes", "0"], "--num-processes must be at least 1, got 0"),
    (["--process-id", "-1"], "--process-id must be at least 0, got -1"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flag_is_one_line_and_exit_2(args, expect, capsys):
    """In-process (no jax import, milliseconds): argparse's own errors and the range checks."""
    with pytest.raises(SystemExit) as stop:
        parse_args(args)
    assert stop.value.code == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"error: {expect}"] and not out.out


UNKNOWN = ("unknown schedule 'bogus'; use one of gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, "
           "dualpipe-v for --schedule")


@pytest.mark.parametrize("args,expect", [
    (["--schedule", "bogus"], UNKNOWN),
    ([*PP, "--schedule", "bogus"], UNKNOWN),
    # without a stage axis these were silently ignored: the run trained unpipelined
    (["--schedule", "1f1b"], "--schedule 1f1b needs pipeline stages, but --mesh data=8 has no "
     "stage axis; add stage=N to --mesh or drop --schedule"),
    (["--microbatches", "4"], "--microbatches 4 needs pipeline stages"),
    (["--virtual-stages", "2"], "--virtual-stages 2 needs pipeline stages"),
    (["--schedule-file", "my.json"], "--schedule-file my.json needs pipeline stages"),
    (["--mesh", "data=4,data=2"],  # the last size silently won
     "mesh axis data is given twice in --mesh 'data=4,data=2'; give it once"),
])
def test_bad_run_flags_are_refused_before_anything_is_built(args, expect):
    """In-process: the checks that need the model and the device count, not a compile."""
    from tppjax.cli.flags import model_config
    from tppjax.cli.train import check_run_flags
    from tppjax.errors import ConfigError

    args = parse_args(BASE[2:8] + args)  # tiny on data=8, one step
    with pytest.raises(ConfigError) as err:
        check_run_flags(args, model_config(args, "small"))
    assert str(err.value).startswith(expect)


@pytest.mark.parametrize("preset,mesh,seq_len", [
    ("tiny", "data=4,tensor=2", 64), ("small", "data=2,tensor=4", 128),
    ("base", "data=2,tensor=4", 128),
])
def test_every_preset_runs_on_the_defaults(preset, mesh, seq_len):
    """`train.py --preset tiny` failed on the default mesh (tensor=4 does not divide tiny's 2
    kv heads) and --seq-len (128 > its 64 positions): both now default from the model, and
    the Trainer (which checks every divisibility, compiling nothing) accepts them."""
    from tppjax.cli.flags import model_config
    from tppjax.cli.train import check_run_flags
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.rules import Rules
    from tppjax.spmd.train_step import TrainConfig, Trainer

    args = parse_args(["--preset", preset])
    cfg = model_config(args, "small")
    assert check_run_flags(args, cfg) == 1 and (args.mesh, args.seq_len) == (mesh, seq_len)
    Trainer(cfg, TrainConfig(), make_mesh(args.mesh), Rules(), (args.batch_size, args.seq_len))


@pytest.mark.parametrize("args,expect", [
    (["--plot", "{d}/loss.xyz"], "--plot {d}/loss.xyz: unsupported file type '.xyz'; end the "
     "name in one of .png, .pdf, .svg, .jpg, .jpeg"),
    (["--profile-dir", "{d}/a_file"], "--profile-dir {d}/a_file: {d}/a_file is a file"),
    (["--profile-dir", "{d}/a_file/trace"], "--profile-dir {d}/a_file/trace: {d}/a_file is a"),
])
def test_bad_output_path_is_refused_at_start(args, expect, tmp_path):
    """Checked before training (they were found only when the plot or the trace was written,
    after the run)."""
    from tppjax.errors import ConfigError
    from tppjax.spmd.outputs import check_run_outputs

    (tmp_path / "a_file").touch()
    args = parse_args([a.format(d=tmp_path) for a in args])
    with pytest.raises(ConfigError) as err:
        check_run_outputs(args.metrics, args.plot, args.profile_dir, resume=args.resume,
                          overwrite=args.overwrite)
    assert str(err.value).startswith(expect.format(d=tmp_path))


@pytest.mark.parametrize("args,expect", [
    (["--kv-heads", "3"], "n_heads (4) must be a multiple of n_kv_heads (3); change --heads or "
     "--kv-heads"),
    (["--heads", "5"], "d_model (32) must be divisible by n_heads (5); change --d-model or"),
    (["--d-model", "20", "--heads", "4"], "rotary positions need an even head_dim (d_model / "
     "n_heads), got 5; change --d-model or --heads"),
    (["--style", "bert"], "unknown --style 'bert'; use llama or gpt2"),
])
def test_bad_model_names_the_flags(args, expect):
    """The model's own checks name the flags to change (they named config fields only)."""
    from tppjax.cli.flags import model_config
    from tppjax.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        model_config(parse_args(["--preset", "tiny", "--kv-heads", "1", *args]), "small").validate()
    assert str(err.value).startswith(expect)


def write_files(d: Path) -> None:
    (d / "ok.txt").write_bytes(b"x" * 1000)
    (d / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')  # must not be truncated
    (d / "empty.txt").touch()
    (d / "empty.bin").touch()
    (d / "odd.bin").write_bytes(b"abc")
    np.array([1, 2, 300] * 100, np.uint16).tofile(d / "big_ids.bin")
    (d / "no_text").mkdir()
    (d / "no_text" / "data.csv").write_text("1,2\n")
    (d / "short.txt").write_bytes(b"x" * 100)
    (d / "shorter.txt").write_bytes(b"x" * 30)
    (d / "a_file").touch()
    (d / "read_only").mkdir(mode=0o555)


def snapshot(d: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("args,expect", [
    (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),  # a real process too
    (["--data", ""], "--data is empty; give a text file, a folder or a .bin"),
    (["--data", "{d}/empty.txt"], "--data {d}/empty.txt is empty"),
    (["--data", "{d}/empty.bin"], "--data {d}/empty.bin is empty"),
    (["--data", "{d}/odd.bin"], "--data {d}/odd.bin has 3 bytes, an odd count"),
    (["--data", "{d}/big_ids.bin"],
     "--data {d}/big_ids.bin holds token id 300 but vocab_size is 256; pass --vocab-size 301"),
    (["--data", "{d}/no_text"], "--data {d}/no_text holds no text (.md, .py, .rst, .txt)"),
    (["--data", "{d}/short.txt"],
     ("--data {d}/short.txt has 100 tokens: 95 to train on and 5 held out (5%), but --seq-len 32 "
      "needs 34 in each part; give at least 661 tokens or a shorter --seq-len (or --eval-every 0")),
    (["--data", "{d}/shorter.txt", "--eval-every", "0"],
     ("--data {d}/shorter.txt has 30 tokens: 28 to train on, but --seq-len 32 needs 34; give at "
      "least 36 tokens or a shorter --seq-len")),
    (["--vocab-size", "100"], "the default corpus holds token id"),  # the stdlib's bytes
    ([*OK, "--checkpoint-dir", "{d}/a_file/ckpt"],
     "cannot create checkpoint directory {d}/a_file/ckpt ({d}/a_file is a file)"),
    ([*OK, "--checkpoint-dir", "{d}/a_file"], "checkpoint directory {d}/a_file is a file"),
    pytest.param([*OK, "--checkpoint-dir", "{d}/read_only"],
                 "checkpoint directory {d}/read_only is not writable",
                 marks=pytest.mark.skipif(AS_ROOT, reason="root may write anywhere")),
    ([*OK, "--checkpoint-dir", "{d}/ckpt", "--resume"],
     "--resume: checkpoint directory {d}/ckpt does not exist; check the path"),
    ([*OK, "--metrics", "{d}/no_dir/m.jsonl"], "--metrics {d}/no_dir/m.jsonl: its folder"),
    ([*OK, "--plot", "{d}/no_text"], "--plot {d}/no_text: is a folder"),
    ([*OK, *PP, "--schedule-file", "{d}/a_file"], "schedule file {d}/a_file is not JSON"),
    ([*OK, *PP, "--schedule-file", "{d}/nope.json"], "cannot read schedule file {d}/nope.json"),
    ([*OK, "--schedule", "1f1b", "--schedule-file", "{d}/a_file"],
     "--schedule 1f1b conflicts with --schedule-file {d}/a_file; give one of them"),
])
def test_bad_file_is_one_line_and_exit_2_and_touches_nothing(args, expect, tmp_path):
    """A real process (about a second: imports jax, compiles nothing)."""
    write_files(tmp_path)
    before = snapshot(tmp_path)
    argv = [a.format(d=tmp_path) for a in BASE + args]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         check=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith("error: " + expect.format(d=tmp_path)), out.stderr
    assert snapshot(tmp_path) == before


def test_unwritable_checkpoint_dir_is_refused_even_as_root(tmp_path, monkeypatch):
    """Root may write anywhere (so the real-permission case above skips as root, which CI is):
    here the permission check itself answers no, and nothing is written into the folder."""
    from tppjax.errors import ConfigError
    from tppjax.spmd import checkpoint

    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)
    target = tmp_path / "read_only"
    target.mkdir()
    with pytest.raises(ConfigError, match=f"^checkpoint directory {target} is not writable; "):
        checkpoint.CheckpointManager.open(target, {})
    assert not any(target.iterdir())


class StubTrainer:
    """Just what `spmd.loop.train` calls: a finite training loss, a NaN eval loss."""

    class tc:  # stands in for a TrainConfig instance
        steps = 4

    def fetch(self, batches, step):
        return batches(step)

    def step(self, params, opt_state, inputs, targets):
        return params, opt_state, {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3}

    def eval_loss(self, params, inputs, targets):
        return math.nan


def test_nan_eval_loss_stops_like_a_nan_training_loss():
    """FloatingPointError naming the step (scripts/train.py prints it as one line with the last
    good checkpoint), raised before that step's state is yielded, so it is never saved."""
    tokens = np.arange(1000, dtype=np.uint16) % 256
    lc = LoopConfig(batch_size=2, seq_len=8, eval_every=2)
    steps = train(StubTrainer(), lc, tokens, tokens, params={}, opt_state={}, start_step=1)
    assert next(steps)[0]["step"] == 1  # no evaluation at step 1
    with pytest.raises(FloatingPointError, match=r"^eval loss became nan at step 2$"):
        next(steps)
