"""Checkpoints on Orbax: sharded params and optimizer state plus a JSON record of the run.

On disk, one directory per saved step (N = the index of the step just completed):

    DIR/step_N/params      nnx.State of global arrays, mesh-independent (OCDBT/Zarr)
    DIR/step_N/opt_state   the optax state, likewise
    DIR/step_N/run         JSON: step, data_position (= N + 1, the next step), seed, model,
                           train, mesh, [tokenizer], and whatever the caller adds
    DIR/train.lock         "PID HOST" of the training run writing DIR, while it runs

Orbax writes a step into `step_N.orbax-checkpoint-tmp*` and renames it to `step_N` only once every
item is on disk, so a save killed midway never looks complete: `latest_step` lists committed
directories only. Saving is asynchronous: `save` returns once the arrays are copied to host
memory (the caller may then donate them to the next step), the files are written in a background
thread. `restore` reads every array straight into the target trainer's shardings (each device
reads only its own shards), so a checkpoint from any mesh restores onto any other and no device
ever holds the full model.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tppjax.errors import ConfigError
from tppjax.models import Transformer
from tppjax.models.config import ModelConfig
from tppjax.spmd.train_step import TrainConfig, Trainer

STEP_PREFIX = "step"  # directories step_0, step_1, ...
ITEMS = ("params", "opt_state", "run")
LOCK = "train.lock"  # DIR/train.lock: "PID HOST" of the training run that writes DIR


def run_info(cfg: ModelConfig, tc: TrainConfig, mesh_spec: str, seed: int | None,
             tokenizer: str | None = None) -> dict[str, Any]:
    """What every checkpoint of a run records about it (as JSON-ready dicts). A seed of None
    (not given) resumes with the saved run's seed, and is 0 for a new run. `tokenizer`: the
    text of the tokenizer.json the data went through (none: bytes), so that sampling and
    export need nothing but the checkpoint."""
    info = {"seed": seed, "mesh": mesh_spec, "model": dataclasses.asdict(cfg),
            "train": dataclasses.asdict(tc)}
    return {**info, "tokenizer": tokenizer} if tokenizer is not None else info


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax reads each shard onto its device."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _abstract_state(trainer: Trainer):
    """The (params, opt_state) trees of `trainer`, shapes and dtypes only: nothing allocated."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(trainer.cfg, nnx.Rngs(0)))
    params = nnx.split(model)[1]
    return params, jax.eval_shape(trainer.tx.init, params)


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


UNAWAITED = r"coroutine '.*' was never awaited"  # Orbax's reads that a failed read cut short


class _UnretrievedFilter(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records: in this program only
    Orbax's reads run on asyncio, and their failure is already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.match(r"(Task|Future) exception was never retrieved", record.getMessage())


def _quiet_failed_read_leftovers() -> None:
    """After a failed read, the other reads Orbax started still complete, and Python reports each
    one at random, before or after our one-line error or at exit: an "Event loop is closed"
    traceback (TensorStore calling back into the loop Orbax has closed), a "Task/Future
    exception was never retrieved" traceback, a "coroutine ... was never awaited" warning
    (filtered in `_restore`), and "Exception ignored in: <coroutine ...>" with the whole
    TensorStore spec (a read left suspended is closed when collected, and Orbax's
    `except BaseException: raise Exception(...) from e` turns that GeneratorExit into an
    error). Drop exactly those; call before reading."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedFilter())
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        closed_loop = isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
        if not (closed_loop or isinstance(getattr(err, "__cause__", None), GeneratorExit)):
            previous(unraisable)

    hook.quiet_closed_loop = True
    sys.unraisablehook = hook


def _unusable(directory: Path) -> ConfigError | None:
    """Why `directory` cannot hold checkpoints, seen without writing anything (None: it can):
    it is a file, a parent is a file, or the nearest existing part of it is not writable."""
    if directory.exists() and not directory.is_dir():
        return ConfigError(f"checkpoint directory {directory} is a file; give a folder")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return ConfigError(f"cannot create checkpoint directory {directory} ({existing} is a "
                           "file); give a folder that can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        return ConfigError(f"checkpoint directory {directory} is not writable; give a folder "
                           "this user may write to")
    return None


def _make_writable_dir(directory: Path) -> None:
    """Create `directory` now, so that a path that cannot hold checkpoints is one line at start
    rather than a traceback (or a failed save in a background thread) later."""
    unusable = _unusable(directory)
    if unusable:
        raise unusable
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create checkpoint directory {directory} ({err.strerror}); "
                          "give a folder that can be created") from err


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Lock:
    """DIR/train.lock holding "PID HOST" while a training run writes DIR. Orbax deletes
    uncommitted step folders when it opens DIR, so a second run on DIR would delete the first
    run's save in flight (and --overwrite its checkpoints): the lock is taken before that, and
    an existing one refuses in one line."""

    def __init__(self, directory: Path):
        self.path, stat = directory / LOCK, directory.stat()
        self.found = set(os.listdir(directory)), (stat.st_atime_ns, stat.st_mtime_ns)
        for _ in range(2):  # a second try: the holder may release it while we read it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                refusal = _lock_refusal(self.path)
                if refusal:
                    raise refusal from None
        else:
            raise ConfigError(f"checkpoint directory {directory}: cannot take its lock "
                              f"{self.path}; another run is starting there")
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")

    def release(self) -> None:
        """Remove the lock; if it was the only change (a refused or restore-only run), DIR is
        left exactly as found, its times included."""
        self.path.unlink(missing_ok=True)
        names, times = self.found
        if set(os.listdir(self.path.parent)) == names:
            with contextlib.suppress(OSError):  # setting times needs DIR's owner: best effort
                os.utime(self.path.parent, ns=times)


def _lock_refusal(path: Path) -> ConfigError | None:
    """Why DIR's lock file `path` refuses a run (None: it is gone). A pid that is not alive on
    this host, or is this very process (a container restarted with the same pid), is a stale
    lock left by a run killed outright."""
    try:
        text = path.read_text(errors="replace").split()
    except FileNotFoundError:
        return None
    directory = path.parent
    pid = int(text[0]) if text and text[0].isdigit() else None
    host = text[1] if len(text) > 1 else "?"
    if pid is not None and host == socket.gethostname() and (pid == os.getpid() or
                                                             not _pid_alive(pid)):
        return ConfigError(f"checkpoint directory {directory} has a stale lock {path} of "
                           f"process {pid}, which is no longer running; if no other run uses "
                           "the folder, delete that file and retry")
    who = f"process {pid} on {host}" if pid is not None else "another run"
    return ConfigError(f"checkpoint directory {directory} is in use by {who} (lock file "
                       f"{path}); wait for that run to end, or give another --checkpoint-dir "
                       "(delete the file only if that run is gone)")


def _holds_checkpoints(directory: Path, latest: Path) -> ConfigError:
    return ConfigError(f"checkpoint directory {directory} already holds checkpoints (latest: "
                       f"{latest.name}); pass --resume to continue that run or --overwrite to "
                       "delete them and start afresh")


def _lock_everywhere(directory: Path) -> _Lock | None:
    """Process 0 takes DIR's lock; every process learns whether it did before any opens DIR
    (all processes share DIR, so one lock is enough). Returns the lock on process 0."""
    lock = error = None
    if jax.process_index() == 0:
        try:
            lock = _Lock(directory)
        except Exception as err:  # any failure: the other processes must hear of it, not hang
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(jax.numpy.int32(error is None))
        if not int(ok):
            error = error or ConfigError(f"process 0 could not lock checkpoint directory "
                                         f"{directory} (see its error)")
    if error:
        raise error
    return lock


class CheckpointManager:
    """One run's checkpoints in one directory. Create with `CheckpointManager.open`."""

    def __init__(self, directory: Path, manager: ocp.CheckpointManager, info: dict,
                 lock: _Lock | None = None):
        self.directory, self._manager, self._run_info = directory, manager, info
        self._lock = lock
        self._name_format = ocp.step.standard_name_format(step_prefix=STEP_PREFIX)

    @staticmethod
    def check_free(directory: str | Path, overwrite: bool) -> None:
        """A fresh run's refusals that need no model, checked before it initialises (with
        --init-from-hf a read of every weight) and without writing: DIR unusable, locked, or
        holding checkpoints without --overwrite. `open` checks them again as it takes the lock;
        it comes after the initialisation, so that a load that fails has deleted nothing."""
        directory = Path(directory).absolute()
        name_format = ocp.step.standard_name_format(step_prefix=STEP_PREFIX)
        steps = directory.is_dir() and sorted(m.step for m in name_format.find_all(directory))
        refusal = _unusable(directory) or directory.is_dir() and _lock_refusal(directory / LOCK)
        if not refusal and steps and not overwrite:
            refusal = _holds_checkpoints(directory, directory / name_format.build_name(steps[-1]))
        if refusal:
            raise refusal

    @classmethod
    def open(cls, directory: str | Path, run_info: dict, *, keep: int = 3,
             overwrite: bool = False, resume: bool = False,
             lock: bool = False) -> "CheckpointManager":
        """Open DIR for a fresh run (refused if it holds checkpoints, unless `overwrite`, which
        deletes them) or, with `resume`, to continue the run saved there (refused if the saved
        model config differs). Uncommitted leftovers of a killed save are deleted either way.
        DIR is created now unless `resume` (which refuses a DIR that does not exist). With
        `lock` (a training run), DIR/train.lock is held until `close` and refuses a second run
        before anything in DIR is touched."""
        directory = Path(directory).absolute()
        if overwrite and resume:
            raise ConfigError("--overwrite and --resume exclude each other; pick one")
        if keep < 1:
            raise ConfigError(f"--keep must be at least 1 checkpoint, got {keep}")
        if resume and not directory.exists():  # a mistyped path must not start a new run
            raise ConfigError(f"--resume: checkpoint directory {directory} does not exist; "
                              "check the path, or drop --resume to start a new run")
        _make_writable_dir(directory)
        held = _lock_everywhere(directory) if lock else None
        try:
            return cls._open(directory, run_info, keep, overwrite, resume, held)
        except BaseException:
            if held:
                held.release()
            raise

    @classmethod
    def _open(cls, directory, run_info, keep, overwrite, resume, held) -> "CheckpointManager":
        options = ocp.CheckpointManagerOptions(
            step_prefix=STEP_PREFIX,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,  # leftovers of saves killed before their commit
            enable_async_checkpointing=True,
        )
        manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
        self = cls(directory, manager, json.loads(json.dumps(run_info)), held)
        latest = self.latest_step()
        if latest is not None and not resume:
            if not overwrite:
                manager.close()
                raise _holds_checkpoints(directory, self.path(latest))
            for step in manager.all_steps():
                manager.delete(step)
        elif latest is not None:
            try:
                self._check_run(latest, self.read_info(latest))
            except ConfigError:
                manager.close()
                raise
        if "seed" in self._run_info and self.seed is None:  # nothing saved to take it from
            self._run_info["seed"] = 0
        return self

    # ---- queries ----------------------------------------------------------------------
    def path(self, step: int) -> Path:
        """DIR/step_N, the checkpoint saved after step N."""
        return self.directory / self._name_format.build_name(step)

    def all_steps(self) -> list[int]:
        """Committed steps on disk, oldest first (a save still in flight is not listed)."""
        return sorted(m.step for m in self._name_format.find_all(self.directory))

    def latest_step(self) -> int | None:
        """The latest *complete* checkpoint, read from disk; None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_info(self, step: int) -> dict:
        """The JSON record of `step`, without touching the arrays."""
        args = ocp.args.Composite(run=ocp.args.JsonRestore())
        return self._restore(step, args).run

    @property
    def seed(self):
        """The run's seed: the saved run's when resuming without one (`run_info` seed None)."""
        return self._run_info.get("seed")

    def _check_run(self, step: int, record: dict) -> None:
        """A resumed run continues the saved one: the same model, tokenizer and seed (which
        fixes the data order); a seed of None takes the saved one."""
        self._check_model(step, record)
        if record.get("tokenizer") != self._run_info.get("tokenizer"):
            raise ConfigError(f"cannot resume from {self.path(step)}: it was trained on "
                              "another tokenizer (or bytes) than this run's --tokenizer; give "
                              "the run's --tokenizer, or --overwrite to start afresh")
        saved, given = record.get("seed"), self._run_info.get("seed")
        if given is None:
            self._run_info["seed"] = saved
        elif saved is not None and saved != given:
            raise ConfigError(
                f"cannot resume from {self.path(step)}: it was saved with --seed {saved} but "
                f"this run has --seed {given}, which would change the data order; pass --seed "
                f"{saved} or drop --seed (the saved one is used)"
            )

    def _check_model(self, step: int, record: dict) -> None:
        saved, current = record.get("model", {}), self._run_info.get("model", {})
        for field in sorted(set(saved) | set(current)):
            if saved.get(field) != current.get(field):
                raise ConfigError(
                    f"cannot resume from {self.path(step)}: it was saved with model {field}="
                    f"{saved.get(field)!r} but this run has {field}={current.get(field)!r}; "
                    "use the saved model settings, or --overwrite to start afresh"
                )

    # ---- save / restore ---------------------------------------------------------------
    def save(self, step: int, params, opt_state, info: dict | None = None) -> None:
        """Start saving after step `step` (asynchronous: `wait()` to block until written).
        Returns once the arrays are in host memory, so they may be donated to the next step.
        Give the canonical state (`Trainer.to_canonical`: uneven stages' padding dropped), so
        that it restores onto any mesh."""
        if step in self.all_steps():
            raise ConfigError(f"checkpoint {self.path(step)} already exists; delete it first")
        record = {"step": step, "data_position": step + 1, **self._run_info, **(info or {})}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            run=ocp.args.JsonSave(record),
        )
        # Orbax first waits for the previous save, so at most one is in flight.
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, trainer: Trainer) -> tuple[Any, Any, dict]:
        """(params, opt_state, info) of `step`, each array placed in `trainer`'s shardings."""
        if step not in self.all_steps():
            raise ConfigError(
                f"no complete checkpoint {self.path(step)}; saved steps: {self.all_steps()}"
            )
        abstract_params, abstract_opt = _abstract_state(trainer)
        params_sharding, opt_sharding = trainer.canonical_shardings
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params, params_sharding)),
            opt_state=ocp.args.StandardRestore(_abstract(abstract_opt, opt_sharding)),
            run=ocp.args.JsonRestore(),
        )
        out = self._restore(step, args)
        self._check_model(step, out.run)
        return *trainer.from_canonical(out.params, out.opt_state), out.run

    def _restore(self, step: int, args: ocp.args.Composite):
        # Any failure inside Orbax/TensorStore (missing or truncated file, bad JSON, shape
        # mismatch) means this checkpoint cannot be used: say so in one line, never start afresh
        # and never fall back to an earlier one unasked (that would drop steps and later collide
        # with the damaged directory when saving that step again): the user deletes it.
        _quiet_failed_read_leftovers()
        try:
            with warnings.catch_warnings():  # a failure may already warn while Orbax unwinds
                warnings.filterwarnings("ignore", UNAWAITED, RuntimeWarning)
                out = self._manager.restore(step, args=args)
            for name in args.keys():
                if out[name] is None:
                    raise FileNotFoundError(f"item {name!r} is missing")
            record = out["run"] if "run" in args.keys() else {"step": step,
                                                               "data_position": step + 1}
            if not (isinstance(record, dict) and isinstance(record.get("model", {}), dict)
                    and (record.get("step"), record.get("data_position")) == (step, step + 1)):
                # An edited record: its fields are used as they are, so they must be sound.
                raise ValueError(f"its record is not that of step {step} (its step, "
                                 "data_position or model was edited)")
            return out
        except Exception as err:  # noqa: BLE001 - converted to one line for the user
            warnings.filterwarnings("ignore", UNAWAITED, RuntimeWarning)  # ... or at exit
            earlier = [s for s in self.all_steps() if s < step]
            previous = (f"after deleting it, --resume continues from {self.path(earlier[-1])}"
                        if earlier else "there is no earlier checkpoint")
            raise ConfigError(
                f"checkpoint {self.path(step)} is unreadable ({_one_line(err)}); "
                f"delete it or resume from an earlier step ({previous})"
            ) from err

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves, release Orbax's threads, then the lock (if held)."""
        try:
            self._manager.close()
        finally:
            if self._lock:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
