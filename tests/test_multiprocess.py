"""Several JAX processes on loopback (scripts/launch_local.py): the same engine as a GPU cluster
or a TPU pod, with CPU devices and gloo collectives. 2 processes x 4 devices must train exactly
like 1 process x 8 devices, their checkpoint must resume in a single process, and a dead process
must bring the launcher down (non-zero) instead of hanging."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tppjax.spmd.distributed import detect_cluster, initialize, local_rows

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
LAUNCH = str(ROOT / "scripts" / "launch_local.py")
TINY = ["--preset", "tiny", "--layers", "4", "--heads", "8", "--kv-heads", "8", "--d-model", "64",
        "--d-ff", "128", "--batch-size", "8", "--seq-len", "32", "--vocab-size", "250",
        "--eval-every", "0", "--warmup", "2"]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(b"".join(p.read_bytes() for p in sorted(ROOT.glob("*/*.py"))))
    return str(path)


def train(corpus, metrics, *args, processes=1):
    """Run scripts/train.py (through the launcher when processes > 1); the metrics records."""
    common = [*TINY, "--data", corpus, "--steps", str(STEPS), "--metrics", str(metrics), *args]
    if processes == 1:
        cmd = [sys.executable, TRAIN, "--cpu-devices", "8", *common]
    else:
        cmd = [sys.executable, LAUNCH, "--processes", str(processes),
               "--cpu-devices-per-process", str(8 // processes), "--", TRAIN, *common]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in Path(metrics).read_text().splitlines()], out.stdout


def check_same(multi, single):
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for a, b in zip(multi, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_two_processes_match_one_dp_tp(tmp_path, corpus):
    mesh = ["--mesh", "data=4,tensor=2"]
    multi, out = train(corpus, tmp_path / "two.jsonl", *mesh, processes=2)
    single, _ = train(corpus, tmp_path / "one.jsonl", *mesh)
    assert len(multi) == STEPS  # one writer: process 0
    check_same(multi, single)
    progress = [line for line in out.splitlines() if " step " in line or "mesh:" in line]
    assert progress and all(line.startswith("[0] ") for line in progress), progress


def test_two_processes_match_one_pipeline_and_checkpoint_resumes_in_one(tmp_path, corpus):
    mesh = ["--mesh", "data=2,stage=2,tensor=2"]
    ckpt = tmp_path / "ckpt"
    multi, _ = train(corpus, tmp_path / "two.jsonl", *mesh, "--checkpoint-dir", str(ckpt),
                     "--checkpoint-every", "3", processes=2)
    single, _ = train(corpus, tmp_path / "one.jsonl", *mesh)
    check_same(multi, single)
    # Both processes wrote their own shards of the arrays.
    assert sorted(p.name for p in (ckpt / "step_2" / "params").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    # Drop the last checkpoint: one process resumes from step 2 and continues the same curve.
    shutil.rmtree(ckpt / "step_5")
    resumed, out = train(corpus, tmp_path / "resumed.jsonl", *mesh, "--checkpoint-dir",
                         str(ckpt), "--resume")
    assert "resumed from" in out and "continuing at step 3" in out
    check_same(resumed, single[3:])


def test_killed_process_stops_the_launcher(tmp_path, corpus):
    cmd = [sys.executable, LAUNCH, "--processes", "2", "--cpu-devices-per-process", "4", "--",
           TRAIN, *TINY, "--data", corpus, "--steps", "100000", "--log-every", "1",
           "--mesh", "data=4,tensor=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen, pid = [], None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until training runs
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            seen.append(line)
            if line.startswith("[launch] process 1: pid "):
                pid = int(line.split()[-1])
            if line.startswith("[0] step "):
                break
        else:
            pytest.fail("training did not start:\n" + "".join(seen[-30:]))
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher stops its children
            proc.wait(timeout=30)
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    text = "".join(seen)
    assert code != 0 and elapsed < 60, (code, elapsed)
    assert "[launch] error: process 1 was killed by SIGKILL" in text, text[-2000:]


# ---- pieces, without processes -------------------------------------------------------------
class FakeSharding:
    """What one process of a multi-process run sees: only its devices' indices."""

    def __init__(self, indices):
        self.indices = indices

    def addressable_devices_indices_map(self, shape):
        return dict(enumerate(self.indices))


def test_local_rows_follow_the_sharding_not_the_process_index():
    # Devices of this process hold rows 8:12 and 24:28 (twice: a replica) of a 32-row batch.
    sharding = FakeSharding([(slice(24, 28), slice(None)), (slice(8, 12), slice(None)),
                             (slice(24, 28), slice(None))])
    assert local_rows(sharding, (32, 5)).tolist() == [8, 9, 10, 11, 24, 25, 26, 27]
    assert local_rows(FakeSharding([(slice(None), slice(None))]), (4, 5)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="dimension 1 is sharded"):
        local_rows(FakeSharding([(slice(0, 4), slice(0, 2))]), (8, 4))


def test_cluster_detection_reads_only_the_environment():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detect_cluster({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
    assert detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: single process
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
                           "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == "tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detect_cluster({}) is None


def test_single_process_needs_nothing_and_bad_flags_are_config_errors(monkeypatch):
    from tppjax.errors import ConfigError

    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    assert initialize() is False
    assert initialize(None, 1, 0) is False
    with pytest.raises(ConfigError, match="need --coordinator"):
        initialize(None, 2, 0)
    with pytest.raises(ConfigError, match="needs --num-processes"):
        initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        initialize("127.0.0.1", 2, 0)
    with pytest.raises(ConfigError, match="outside 0..1"):
        initialize("127.0.0.1:1234", 2, 2)
