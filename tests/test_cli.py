"""scripts/train.py end to end, the same loss curve on every mesh, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--layers", "4", "--heads", "8", "--kv-heads", "8", "--d-model", "64",
        "--d-ff", "128", "--batch-size", "8", "--seq-len", "32", "--vocab-size", "250",
        "--eval-every", "0", "--warmup", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (this repository's sources): fast to load, the same everywhere."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(b"".join(p.read_bytes() for p in sorted(ROOT.glob("*/*.py"))))
    return str(path)


def run(*args, cpu_devices=8):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--cpu-devices", str(cpu_devices),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          check=False)


def losses(tmp_path, corpus, name, *args, cpu_devices=8):
    metrics = tmp_path / f"{name}.jsonl"
    out = run(*TINY, "--data", corpus, "--steps", "6", "--metrics", str(metrics), *args,
              cpu_devices=cpu_devices)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_train_script_loss_falls_and_writes_metrics(tmp_path, corpus):
    records = losses(tmp_path, corpus, "dp_tp", "--mesh", "data=2,tensor=4", "--steps", "12",
                     "--lr", "1e-2")
    assert [r["step"] for r in records] == list(range(12))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] - 0.5


@pytest.mark.slow
def test_same_loss_curve_on_every_mesh(tmp_path, corpus):
    one = [r["loss"] for r in losses(tmp_path, corpus, "one", "--mesh", "data=1", cpu_devices=1)]
    # One run per family through the command line; every layout x schedule is held to one
    # device in-process (tests/test_tensor_parallel.py, tests/test_executor.py).
    # "stage=4,tensor=2": uneven stages, the last with no layer (padding slots only)
    for i, mesh in enumerate([
            "data=4,tensor=2 --sequence-parallel", "stage=4,tensor=2 --stage-layers 1,2,1,0",
            "stage=2,tensor=4 --schedule interleaved --virtual-stages 2",
            "stage=2,data=4 --schedule zb-h1 --microbatches 2 --sequence-parallel"]):
        curve = [r["loss"] for r in losses(tmp_path, corpus, f"m{i}", "--mesh", *mesh.split())]
        assert curve == pytest.approx(one, rel=1e-5), mesh


def one_line_error(out, *expect):
    """Exit 2, no traceback, exactly one stderr line holding every string in `expect`."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expect), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,expect", [
    (["--mesh", "data=2,tensor=2"], "needs 4 devices but 8"),
    (["--mesh", "data=2,model=4"], "unknown mesh axis 'model'"),
    (["--mesh", "tensor=8", "--heads", "4", "--kv-heads", "4"], "n_heads (4)"),
    (["--mesh", "tensor=8", "--heads", "8", "--kv-heads", "2"], "n_kv_heads (2)"),
    (["--mesh", "tensor=8", "--d-ff", "100"], "d_ff (mlp width) (100)"),
    (["--mesh", "tensor=8", "--vocab-multiple", "2"], "padded vocabulary (250)"),
    (["--mesh", "data=8", "--batch-size", "12"], "batch size (12)"),
    (["--data", "/no/such/file.txt"], "--data /no/such/file.txt"),
    (["--mesh", "stage=2,tensor=4", "--stage-layers", "3,2"],
     "--stage-layers 3,2 must give 2 numbers (stages x virtual stages = 2 x 1) that sum to "
     "the 4 layers"),
    (["--mesh", "stage=2,tensor=4", "--stage-layers", "2,x"], "--stage-layers '2,x'"),
    (["--mesh", "stage=2,tensor=4", "--microbatches", "3"], "--microbatches 3"),
    (["--mesh", "stage=2,tensor=4", "--schedule", "pipedream"], "unknown schedule 'pipedream'"),
    (["--mesh", "stage=2,tensor=4", "--schedule", "interleaved", "--virtual-stages", "2",
      "--microbatches", "1"], "interleaved needs microbatches (1) to be a multiple of stages"),
    (["--mesh", "stage=2,tensor=4", "--schedule", "interleaved", "--virtual-stages", "2",
      "--stage-layers", "1,1,2"], "must give 4 numbers (stages x virtual stages = 2 x 2)"),
])
def test_bad_input_is_one_line_and_exit_2(args, expect, corpus):
    one_line_error(run(*TINY, "--data", corpus, "--steps", "1", *args), expect)


def test_resume_continues_the_same_loss_curve(tmp_path, corpus):
    """Steps 3..5 after resuming from the step-2 checkpoint equal those of the straight run,
    which ran uneven pipeline stages (the checkpoint holds the unpadded layers: it resumes on
    tensor=8). The same checkpoints then serve the --resume refusals: a finished run, a
    corrupt latest step."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()  # exists but empty: --resume starts from step 0 and says so
    metrics = tmp_path / "straight.jsonl"
    out = run(*TINY, "--data", corpus, "--steps", "6", "--metrics", str(metrics),
              "--checkpoint-dir", str(ckpt), "--checkpoint-every", "3", "--resume",
              "--mesh", "stage=2,tensor=4", "--stage-layers", "3,1")
    assert out.returncode == 0, out.stderr
    assert f"no checkpoint in {ckpt} yet: starting from step 0" in out.stdout.splitlines()
    straight = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2", "step_5"]
    shutil.rmtree(ckpt / "step_5")  # as if the run had stopped after step 2
    resumed = losses(tmp_path, corpus, "resumed", "--checkpoint-dir", str(ckpt), "--resume",
                     "--mesh", "tensor=8")  # onto another mesh, too
    assert [r["step"] for r in resumed] == [3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[3:]],
                                                         rel=1e-5)
    refused = run(*TINY, "--data", corpus, "--steps", "6", "--checkpoint-dir", str(ckpt))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr

    resume = [*TINY, "--data", corpus, "--checkpoint-dir", str(ckpt), "--resume",
              "--metrics", str(metrics)]
    one_line_error(run(*resume, "--steps", "6"),
                   f"the run in {ckpt} has already done 6 steps of --steps 6: nothing to train")
    for f in (ckpt / "step_5" / "params").rglob("d/*"):  # truncate the latest's array data
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    one_line_error(run(*resume, "--steps", "9"), f"checkpoint {ckpt / 'step_5'} is unreadable (",
                   f"--resume continues from {ckpt / 'step_2'})")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing touched
