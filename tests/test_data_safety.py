"""Nothing the user saved is lost: a second run on a checkpoint folder, an existing metrics file,
a resume with another seed or tokenizer, an export into a checkpoint folder, an edited record.
Each refusal is one line `error: ...` and exit code 2, and leaves every file as it was. Also:
one step numbering and a summary line, the run's tokenizer in sampling and export. In-process
(scripts' `main`), on one tiny training run shared by the file."""

import contextlib
import gc
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tppjax.cli import train as train_script

TOKENIZER = Path(__file__).parent / "fixtures" / "hf" / "gpt2"  # 300 ids
TINY = ["--cpu-devices", "8", "--preset", "tiny", "--mesh", "data=8", "--seq-len", "32",
        "--batch-size", "8", "--vocab-size", "256", "--eval-every", "2"]


def snapshot(d: Path) -> dict:
    """Files' bytes, folders' times (a lock file made and removed shows there)."""
    return {p: p.read_bytes() if p.is_file() else p.stat().st_mtime_ns
            for p in sorted([d, *d.rglob("*")])}


def refused(capsys, argv, expect: str, main=train_script.main) -> str:
    """`main(argv)` exits 2 with one stderr line starting `error: ` and containing `expect`."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    # Random bytes: every window differs, so another data order is another loss.
    path.write_bytes(np.random.default_rng(0).integers(32, 127, 4000, np.uint8).tobytes())
    return path


@pytest.fixture
def busy(tmp_path) -> Path:
    """A checkpoint folder as a running training leaves it: a lock, a save in flight."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (ckpt / "step_3.orbax-checkpoint-tmp-1" / "params").write_text("half written")
    return ckpt


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]])
def test_second_run_on_a_busy_checkpoint_dir_touches_nothing(busy, corpus, capsys, flags):
    """Orbax deletes uncommitted step folders when it opens DIR: the lock must refuse first."""
    (busy / "train.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")
    before = snapshot(busy)
    refused(capsys, [*TINY, "--data", str(corpus), "--checkpoint-dir", str(busy), *flags],
            f"is in use by process {os.getppid()} on {socket.gethostname()} (lock file ")
    assert snapshot(busy) == before


@pytest.mark.parametrize("owner", ["gone", "this process"])
def test_stale_lock_names_the_process_and_the_fix(busy, corpus, capsys, owner):
    """A pid that has ended, or this very process's pid (a container restarted with the same
    pid: no lock of ours exists before we take it), is a run killed outright."""
    if owner == "gone":
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid = gone.pid
    else:
        pid = os.getpid()
    (busy / "train.lock").write_text(f"{pid} {socket.gethostname()}\n")
    before = snapshot(busy)
    refused(capsys, [*TINY, "--data", str(corpus), "--checkpoint-dir", str(busy)],
            f"stale lock {busy / 'train.lock'} of process {pid}, which is no longer "
            "running; if no other run uses the folder, delete that file")
    assert snapshot(busy) == before


@pytest.mark.parametrize("held", ["lock", "checkpoint"])
def test_busy_folder_is_refused_before_the_model_is_built(tmp_path, corpus, monkeypatch, capsys,
                                                          held):
    """A fresh run initialises (with --init-from-hf: reads every weight) before it opens DIR,
    so that a load that fails deletes nothing; a lock or checkpoints in DIR are refused first."""
    if held == "lock":
        (tmp_path / "train.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")
    else:
        (tmp_path / "step_2").mkdir()

    def initial_state(*args):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(train_script, "initial_state", initial_state)
    refused(capsys, [*TINY, "--data", str(corpus), "--checkpoint-dir", str(tmp_path)],
            "is in use by process" if held == "lock" else "already holds checkpoints")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_lock_is_released_on_ctrl_c_and_sigterm(tmp_path, corpus, monkeypatch, stop):
    """Ctrl-C, or a scheduler's SIGTERM (preemption), while the model is initialised (--resume
    of a folder with no checkpoint yet: the manager is open, not yet handed to the training
    loop, whose own exit closes it): the lock goes with the run, so a requeued job's --resume
    is not refused; the SIGTERM handler is the caller's again afterwards."""

    def interrupted(*args):
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_script, "initial_state", interrupted)
    with pytest.raises(SystemExit if stop == "sigterm" else KeyboardInterrupt) as stopped:
        train_script.main([*TINY, "--data", str(corpus), "--checkpoint-dir", str(tmp_path),
                           "--resume"])
    assert stop == "ctrl-c" or stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """One finished run: 4 steps through GPT-2's test tokenizer, checkpoints after steps 1 and
    3, seed 5; its metrics lines."""
    d = tmp_path_factory.mktemp("run")
    common = [*TINY, "--data", str(corpus), "--steps", "4", "--checkpoint-every", "2",
              "--tokenizer", str(TOKENIZER), "--vocab-size", "300"]
    argv = [*common, "--seed", "5", "--checkpoint-dir", str(d / "ckpt"), "--metrics",
            str(d / "metrics.jsonl")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert train_script.main(argv) == 0
    (d / "console.txt").write_text(out.getvalue())
    return d, common, argv, (d / "metrics.jsonl").read_text().splitlines()


def test_one_step_numbering_and_a_summary(run):
    """Steps count from 0 on the console as in the metrics and the checkpoint names (step_N is
    saved after step N); each save is one line; the last line sums the run up."""
    d, _, _, lines = run
    assert not (d / "ckpt" / "train.lock").exists()
    metrics = [json.loads(line) for line in lines]
    console = (d / "console.txt").read_text().splitlines()
    shown = [line for line in console if line.startswith("step ")]
    assert [line.split()[1] for line in shown] == ["0/3", "2/3", "3/3"]  # log, eval, last
    for line in shown:  # each agrees with the metrics record of its step
        record = metrics[int(line.split()[1].split("/")[0])]
        assert f"loss {record['loss']:.4f}" in line, (line, record)
    assert [line for line in console if line.startswith("saving")] == [
        f"saving checkpoint {d / 'ckpt' / 'step_1'}", f"saving checkpoint {d / 'ckpt' / 'step_3'}"]
    assert console[-1].startswith("done: steps 0..3 in ")
    assert console[-1].endswith(
        f" s; final loss {metrics[-1]['loss']:.4f}, eval loss {metrics[-1]['eval_loss']:.4f}; "
        f"wrote metrics {d / 'metrics.jsonl'}, checkpoint {d / 'ckpt' / 'step_3'}")


def test_existing_metrics_file_is_refused(run, tmp_path, capsys):
    d, common, _, _ = run
    before = snapshot(d)
    fresh = [*common, "--metrics", str(d / "metrics.jsonl")]
    refused(capsys, fresh, f"--metrics {d / 'metrics.jsonl'} already exists; give a new file, "
            "--resume to append")
    assert snapshot(d) == before


def test_resume_appends_metrics_without_repeating_steps(run, tmp_path, capsys):
    """Resumed from step 1 (the checkpoint of step 3 deleted): the lines of steps 2 and 3 the
    first run wrote go, the resumed run writes them again; each step is listed once."""
    d, common, _, straight = run
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    shutil.copytree(d / "ckpt", ckpt)
    shutil.rmtree(ckpt / "step_3")
    metrics.write_text("\n".join(straight) + '\n{"step": 3, "lo')  # a line cut short by a kill
    argv = [*common, "--checkpoint-dir", str(ckpt), "--metrics", str(metrics), "--resume"]
    # No --seed: the saved seed 5 continues the same data order.
    capsys.readouterr()
    assert train_script.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt / 'step_1'}: continuing at step 2\n" in out
    assert f"--metrics {metrics}: dropped 3 lines of steps 2 and later" in out
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert lines[:2] == [json.loads(line) for line in straight[:2]]
    assert [r["loss"] for r in lines[2:]] == pytest.approx(
        [json.loads(line)["loss"] for line in straight[2:]], rel=1e-6)


def test_resume_with_another_seed_is_refused(run, capsys):
    """Another seed is another data order: refused, naming both (the test above resumes
    without --seed and continues the seed-5 run exactly)."""
    d, _, argv, _ = run
    before = snapshot(d)
    refused(capsys, [*argv, "--resume", "--steps", "6", "--seed", "0"],
            f"cannot resume from {d / 'ckpt' / 'step_3'}: it was saved with --seed 5 but this "
            "run has --seed 0, which would change the data order; pass --seed 5 or drop --seed")
    assert snapshot(d) == before  # the lock it took is gone too


def test_export_into_the_checkpoint_dir_is_refused(run, capsys):
    """A model folder inside DIR would be in the way of the next --resume."""
    from tppjax.cli import hf as hf_script

    d = run[0]
    before = snapshot(d)
    out = d / "ckpt" / "hf"
    refused(capsys, ["export", "--checkpoint-dir", str(d / "ckpt"), "--out", str(out)],
            f"--out {out} is inside --checkpoint-dir {d / 'ckpt'}; give a folder outside it",
            main=hf_script.main)
    assert snapshot(d) == before


class Pending:
    def __await__(self):
        yield


async def read_like_orbax():
    """Orbax's `_read_array_index_and_device_put`: any BaseException becomes an Exception."""
    try:
        await Pending()
    except BaseException as e:
        raise Exception("Encountered error while reading array index: ...") from e


def test_reads_left_suspended_by_a_failed_read_are_not_reported(monkeypatch):
    """A failed checkpoint read leaves other reads suspended; collected, each printed "Exception
    ignored in: <coroutine ...>" and a TensorStore spec (a hundred lines) after the one error
    line. Other unraisable errors still reach Python's hook."""
    from tppjax.spmd.checkpoint import _quiet_failed_read_leftovers

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
    _quiet_failed_read_leftovers()
    read = read_like_orbax()
    read.send(None)  # suspended at its await, like a read cut short
    del read
    gc.collect()
    assert seen == []

    class Broken:
        def __del__(self):
            raise ValueError("not Orbax's")

    Broken()
    gc.collect()
    assert seen == ["ValueError(\"not Orbax's\")"]


@pytest.mark.parametrize("edit", [('"data_position": 4', '"data_position": "x"'),
                                  ('"model": {', '"model": "llama", "was": {')])
def test_edited_checkpoint_record_is_one_line(run, tmp_path, capsys, edit):
    d, common, _, _ = run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", ckpt)
    record = ckpt / "step_3" / "run" / "metadata"
    record.write_text(record.read_text().replace(*edit))
    before = snapshot(tmp_path)
    refused(capsys, [*common, "--steps", "6", "--checkpoint-dir", str(ckpt), "--resume"],
            f"checkpoint {ckpt / 'step_3'} is unreadable (ValueError: its record is not that of "
            "step 3 (its step, data_position or model was edited)); delete it or resume")
    assert snapshot(tmp_path) == before


def test_sample_and_export_use_the_tokenizer_of_the_run(run, tmp_path, capsys, monkeypatch):
    """The checkpoint records the tokenizer.json the run trained through: sample.py encodes the
    prompt and decodes the output with it (not as bytes), export writes it next to the model."""
    from tokenizers import Tokenizer

    from tppjax.cli import hf as hf_script
    from tppjax.cli import sample as sample_script
    from tppjax.spmd import sampling

    d = run[0]
    tokenizer = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    prompt = tokenizer.encode("hello world", add_special_tokens=False).ids
    seen = []

    def generate(trainer, params, tokens, *args):  # the model's part is tested elsewhere
        seen.append(tokens.tolist())
        return np.asarray([[*tokens, 280, 290]])

    monkeypatch.setattr(sampling, "generate", generate)
    capsys.readouterr()
    assert sample_script.main(["--checkpoint-dir", str(d / "ckpt"), "--prompt", "hello world",
                               "--max-new-tokens", "2"]) == 0
    assert seen == [prompt]
    assert capsys.readouterr().out == tokenizer.decode([*prompt, 280, 290]) + "\n"

    assert hf_script.main(["export", "--checkpoint-dir", str(d / "ckpt"), "--out",
                           str(tmp_path / "hf")]) == 0
    assert ((tmp_path / "hf" / "tokenizer.json").read_text()
            == (TOKENIZER / "tokenizer.json").read_text())


def test_resume_without_the_runs_tokenizer_is_refused(run, capsys):
    d, common, _, _ = run
    before = snapshot(d)
    bytes_run = common[:common.index("--tokenizer")]
    refused(capsys, [*bytes_run, "--vocab-size", "300", "--checkpoint-dir", str(d / "ckpt"),
                     "--resume", "--steps", "6"],
            f"cannot resume from {d / 'ckpt' / 'step_3'}: it was trained on another tokenizer")
    assert snapshot(d) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_sample_refuses_a_temperature_that_is_not_a_number_above_0(tmp_path, value, capsys):
    """Refused before the model loads (NaN passed `temperature < 0` and sampled garbage): the
    checkpoint folder does not even exist, and that is not what the error names."""
    from tppjax.cli import sample as sample_script

    refused(capsys, ["--checkpoint-dir", str(tmp_path / "none"), "--prompt", "x",
                     "--max-new-tokens", "4", "--temperature", value],
            f"--temperature must be a finite number >= 0 (0: greedy), got {float(value)}",
            main=sample_script.main)
