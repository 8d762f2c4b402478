"""Checkpoints: exact resume, restore onto any mesh, crash safety, overwrite guard, corruption."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import RTOL, TEST_MODEL, batch, rel_err, trainer
from tppjax.errors import ConfigError
from tppjax.spmd.checkpoint import CheckpointManager, run_info
from tppjax.spmd.train_step import TrainConfig

MESH = "data=2,tensor=4"
INFO = run_info(TEST_MODEL, TrainConfig(), MESH, seed=0)
ROOT = Path(__file__).resolve().parents[1]


def train(tr, params, opt_state, steps):
    """Run `steps` (batch i for step i); return the new state and the losses."""
    losses = []
    for step in steps:
        params, opt_state, metrics = tr.step(params, opt_state, *tr.place(batch(seed=step)))
        losses.append(float(metrics["loss"]))
    return params, opt_state, losses


@pytest.fixture(scope="module")
def tr():
    """One trainer on MESH for the whole file: its init and step compile once."""
    return trainer(TEST_MODEL, MESH)


@pytest.fixture(scope="module")
def initial(tr):
    """The initial (params, opt_state) on the host (`init` compiles anew at every call)."""
    return jax.device_get(tr.init(0))


def fresh(tr, initial):
    """The initial state placed on `tr`'s mesh: new buffers, so `step` may donate them."""
    return jax.device_put(initial, (tr.param_shardings, tr.opt_shardings))


def saved(tr, initial, directory, steps=(0,)):
    """Commit checkpoints of the initial state at `steps` into `directory`."""
    params, opt_state = fresh(tr, initial)
    with CheckpointManager.open(directory, INFO) as ckpt:
        for step in steps:
            ckpt.save(step, params, opt_state)


def test_resume_is_bit_identical(tr, initial, tmp_path):
    _, _, straight = train(tr, *fresh(tr, initial), range(4))

    params, opt_state, first = train(tr, *fresh(tr, initial), range(2))
    ckpt = CheckpointManager.open(tmp_path, INFO)
    ckpt.save(1, params, opt_state)
    # Keep training at once: the next step donates the saved buffers while the write is in flight.
    train(tr, params, opt_state, [2])
    ckpt.close()

    tr = trainer(TEST_MODEL, MESH)  # a new process would start from here
    ckpt = CheckpointManager.open(tmp_path, INFO, resume=True)
    step = ckpt.latest_step()
    params, opt_state, info = ckpt.restore(step, tr)
    ckpt.close()
    assert (step, info["step"], info["data_position"]) == (1, 1, 2)
    assert info["model"] == INFO["model"] and info["mesh"] == MESH
    _, _, rest = train(tr, params, opt_state, range(info["data_position"], 4))
    assert first + rest == straight


def assert_restored(tr, state, saved_state):
    """Every leaf of the restored (params, opt_state) carries `tr`'s sharding on `tr`'s mesh and
    equals the saved one bit for bit: the stored arrays are global and mesh-independent and
    restoring only reads them, nothing is recomputed (so no rounding tolerance is due)."""
    assert jax.tree.structure(state) == jax.tree.structure(saved_state)
    shardings = jax.tree.leaves((tr.param_shardings, tr.opt_shardings))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, leaf), sharding, want in zip(leaves, shardings, jax.tree.leaves(saved_state),
                                            strict=True):
        where = jax.tree_util.keystr(path)
        assert leaf.sharding == sharding and leaf.sharding.mesh == tr.mesh, where
        np.testing.assert_array_equal(jax.device_get(leaf), want, err_msg=where)


@pytest.fixture(scope="module")
def after_one_step(tr, initial, tmp_path_factory):
    """A checkpoint after step 0 on MESH, its (params, opt_state) on the host, and the loss of
    step 1."""
    directory = tmp_path_factory.mktemp("ckpt")
    params, opt_state, _ = train(tr, *fresh(tr, initial), [0])
    with CheckpointManager.open(directory, INFO) as ckpt:
        ckpt.save(0, params, opt_state)
    host_state = jax.device_get((params, opt_state))
    # Adam's moments and count have moved off their initial zeros: a restore that dropped the
    # optimizer state for a fresh one could not pass for this one.
    assert all(np.any(leaf) for leaf in jax.tree.leaves(host_state[1]))
    _, _, (next_loss,) = train(tr, params, opt_state, [1])
    return directory, host_state, next_loss


@pytest.mark.parametrize("target", ["tensor=8", "data=8", "single"])
def test_restore_onto_another_mesh(after_one_step, target):
    directory, host_state, next_loss = after_one_step
    tr = trainer(TEST_MODEL, target)
    with CheckpointManager.open(directory, INFO, resume=True) as ckpt:
        params, opt_state, _ = ckpt.restore(0, tr)
    assert_restored(tr, (params, opt_state), host_state)
    # The next step re-associates sums over another set of shards: equal to float32 rounding.
    _, _, (loss,) = train(tr, params, opt_state, [1])
    assert rel_err(loss, next_loss) <= RTOL, f"{target}: loss {loss} vs {MESH}: {next_loss}"


PIPE_MODEL = dataclasses.replace(TEST_MODEL, n_layers=4)


@pytest.mark.slow
def test_pipeline_checkpoint_restores_onto_every_layout(tmp_path):
    """Saved from data=2,stage=2,tensor=2 under 1f1b; every params and optimizer-state leaf
    restores bit for bit onto other meshes and schedules, in their layouts, and the next step's
    loss there equals the original's to float32 rounding."""
    source = trainer(PIPE_MODEL, "data=2,stage=2,tensor=2", microbatches=2, schedule="1f1b")
    params, opt_state = source.init(0)
    params, opt_state, _ = train(source, params, opt_state, [0])
    info = run_info(PIPE_MODEL, source.tc, "data=2,stage=2,tensor=2", seed=0)
    with CheckpointManager.open(tmp_path, info) as ckpt:
        ckpt.save(0, params, opt_state)
    host_state = jax.device_get((params, opt_state))
    _, _, (next_loss,) = train(source, params, opt_state, [1])
    for target, kw in [("tensor=8", {}), ("stage=4,tensor=2", {"microbatches": 4,
                       "schedule": "zb-h1"}), ("data=8", {}), ("single", {})]:
        tr = trainer(PIPE_MODEL, target, **kw)
        with CheckpointManager.open(tmp_path, info, resume=True) as ckpt:
            params, opt_state, _ = ckpt.restore(0, tr)
        assert_restored(tr, (params, opt_state), host_state)
        _, _, (loss,) = train(tr, params, opt_state, [1])
        assert rel_err(loss, next_loss) <= RTOL, f"{target}: loss {loss} vs {next_loss}"


# Restores step 1, then kills itself at the very moment Orbax commits step 2: every file of step 2
# is written (into step_2.orbax-checkpoint-tmp*) but the rename to step_2 never happens. Hooking
# the commit's rename makes the kill deterministic, unlike a timer racing the background write;
# the uncommitted directory it leaves is exactly what a kill at any earlier moment leaves, or less.
CRASHING_SAVE = """
import os, signal, sys
from tppjax.spmd.checkpoint import CheckpointManager
from tests.test_checkpoint import INFO, MESH, TEST_MODEL, trainer

rename = os.rename
def killing_rename(src, dst):
    if os.path.basename(src).startswith("step_2.orbax-checkpoint-tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.rename = killing_rename

ckpt = CheckpointManager.open(sys.argv[1], INFO, resume=True)
params, opt_state, _ = ckpt.restore(1, trainer(TEST_MODEL, MESH))
ckpt.save(2, params, opt_state)
ckpt.wait()
"""


def test_killed_save_is_ignored(tr, initial, tmp_path):
    saved(tr, initial, tmp_path, steps=(1,))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the save was not killed:\n{proc.stderr[-2000:]}"
    assert (tmp_path / "step_1").is_dir() and not (tmp_path / "step_2").exists()
    (partial,) = tmp_path.glob("step_2.orbax-checkpoint-tmp*")
    assert {p.name for p in partial.iterdir()} >= {"params", "opt_state", "run"}

    with CheckpointManager.open(tmp_path, INFO, resume=True) as ckpt:
        assert ckpt.latest_step() == 1
        params, _, info = ckpt.restore(1, tr)
    assert info["step"] == 1
    assert not partial.exists(), "the uncommitted leftovers were not cleaned up"
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(initial[0]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_fresh_run_refuses_a_directory_with_checkpoints(tr, initial, tmp_path):
    saved(tr, initial, tmp_path, steps=(0, 1))
    with pytest.raises(ConfigError, match="--overwrite") as err:
        CheckpointManager.open(tmp_path, INFO)
    assert str(tmp_path) in str(err.value) and "--resume" in str(err.value)
    with CheckpointManager.open(tmp_path, INFO, overwrite=True) as ckpt:
        assert ckpt.latest_step() is None
    assert not list(tmp_path.glob("step_*"))


def test_keeps_the_latest(tr, initial, tmp_path):
    params, opt_state = fresh(tr, initial)
    with CheckpointManager.open(tmp_path, INFO, keep=2) as ckpt:
        for step in range(4):
            ckpt.save(step, params, opt_state, {"note": step})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        assert ckpt.read_info(3)["note"] == 3


def test_resume_refuses_another_model(tr, initial, tmp_path):
    saved(tr, initial, tmp_path)
    other = {**INFO, "model": {**INFO["model"], "d_model": 128}}
    with pytest.raises(ConfigError, match="d_model=64 but this run has d_model=128"):
        CheckpointManager.open(tmp_path, other, resume=True)


def truncate_data(step_dir: Path):
    for f in (step_dir / "params").rglob("d/*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete_manifest(step_dir: Path):
    for f in (step_dir / "opt_state").rglob("manifest.ocdbt"):
        f.unlink()


def garble_json(step_dir: Path):
    (step_dir / "run" / "metadata").write_text("{not json")


@pytest.mark.parametrize("damage", [truncate_data, delete_manifest, garble_json])
def test_corrupt_checkpoint_is_a_clear_error(tr, initial, tmp_path, damage):
    saved(tr, initial, tmp_path, steps=(0, 1))
    damage(tmp_path / "step_1")
    # Resuming reads the JSON record at open and the arrays at restore: either may fail first.
    with pytest.raises(ConfigError, match="delete it or resume from an earlier step") as err:
        with CheckpointManager.open(tmp_path, INFO, resume=True) as ckpt:
            ckpt.restore(ckpt.latest_step(), tr)
    assert f"checkpoint {tmp_path / 'step_1'} is unreadable (" in str(err.value)
    assert "\n" not in str(err.value)
    shutil.rmtree(tmp_path / "step_1")  # the fix the message suggests
    with CheckpointManager.open(tmp_path, INFO, resume=True) as ckpt:
        assert ckpt.latest_step() == 0
        ckpt.restore(0, tr)


def bounds(index, shape) -> tuple[tuple[int, int], ...]:
    """(start, stop) per dimension of a shard's index (a whole dimension: (0, n))."""
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))


def test_restore_reads_each_device_only_its_shards(after_one_step, monkeypatch):
    """Counted where Orbax reads a stored array: every read is one shard of the target sharding
    (its index, onto exactly the devices that hold that index), each shard once. A restore that
    read whole arrays onto one device and resharded afterwards would read indices the target
    does not have, onto devices that are not theirs."""
    from orbax.checkpoint._src.serialization import serialization

    directory, host_state, _ = after_one_step
    tr = trainer(TEST_MODEL, "tensor=8")
    reads = []  # (global shape, index bounds, device ids), one per read
    read = serialization._read_array_index_and_device_put

    async def counting_read(devices, index, t, *, global_shape, **kw):
        shape = tuple(global_shape)
        reads.append((shape, bounds(index, shape), frozenset(d.id for d in devices)))
        return await read(devices, index, t, global_shape=global_shape, **kw)

    monkeypatch.setattr(serialization, "_read_array_index_and_device_put", counting_read)
    with CheckpointManager.open(directory, INFO, resume=True) as ckpt:
        params, opt_state, _ = ckpt.restore(0, tr)
    assert_restored(tr, (params, opt_state), host_state)
    want = []
    for leaf, sharding in zip(jax.tree.leaves(host_state),
                              jax.tree.leaves((tr.param_shardings, tr.opt_shardings)), strict=True):
        holders = {}
        for device, index in sharding.devices_indices_map(leaf.shape).items():
            holders.setdefault(bounds(index, leaf.shape), set()).add(device.id)
        want += [(leaf.shape, key, frozenset(ids)) for key, ids in holders.items()]
    assert sorted(reads, key=str) == sorted(want, key=str)
    assert any(len(ids) == 1 for _, _, ids in want)  # shards that one device alone holds
