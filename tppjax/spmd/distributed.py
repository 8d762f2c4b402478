"""Multi-process runs: start JAX's distributed runtime and find the batch rows this process holds.

One process per host (GPU clusters may run one per GPU): every process runs the same script on
the same global mesh, and JAX's runtime (`jax.distributed.initialize`) connects them. The
runtime starts from explicit flags (`--coordinator HOST:PORT --num-processes N --process-id I`)
or, with `--coordinator auto` or inside a detected SLURM job / Open MPI launch / multi-host TPU
slice, from the environment (JAX reads it). A run without any of these is single-process and
starts nothing.

Only process 0 prints and writes metrics; every process writes its own checkpoint shards.
"""

import argparse
import os
import re

import numpy as np

# Nothing here imports jax at module level: `add_flags` runs before the script sets XLA_FLAGS and
# JAX_PLATFORMS, which jax reads once.

# What jax.distributed.initialize() auto-detects, checked here from the environment only (no
# network calls): only then is it called with no arguments.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
TPU_MULTIHOST_VARS = ("MEGASCALE_COORDINATOR_ADDRESS", "TPU_PROCESS_ADDRESSES")


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process (see spmd/distributed.py)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address; 'auto': let JAX read SLURM / Open MPI / TPU env")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")


def detect_cluster(env=None) -> str | None:
    """'slurm', 'ompi' or 'tpu' when this process is one of several launched by them, else None."""
    env = os.environ if env is None else env

    def count(name, default=1):
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    if all(v in env for v in SLURM_VARS) and count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE", 2) > 1:
        return "ompi"
    if any(env.get(v) for v in TPU_MULTIHOST_VARS) or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 100) -> bool:
    """Start JAX's distributed runtime when the flags or the environment ask for it (True), or
    do nothing for a single-process run (False). Call before any other JAX work."""
    from tppjax.errors import ConfigError

    if coordinator not in (None, "auto"):
        if not re.fullmatch(r"\[?[^\s\]]+\]?:\d{1,5}", coordinator):
            raise ConfigError(f"--coordinator {coordinator!r}: give HOST:PORT (e.g. "
                              "10.0.0.1:1234) or 'auto'")
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator HOST:PORT needs --num-processes N and --process-id I")
    elif coordinator is None and detect_cluster() is None:
        if (num_processes or 1) != 1 or (process_id or 0) != 0:
            raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT "
                              "(or 'auto' inside SLURM, Open MPI or a TPU pod slice)")
        return False
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ConfigError(f"--process-id {process_id} is outside 0..{num_processes - 1}")

    import jax

    # Cross-process collectives on CPU (tests, local runs): gloo over TCP. It is jax 0.10's
    # default already; set here so the choice is explicit. GPU/TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator != "auto" and coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def is_primary() -> bool:
    """True on process 0 (the one that prints and writes metrics), and in single-process runs."""
    import jax

    return jax.process_index() == 0


def local_rows(sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Indices of the rows (dim 0) of a `global_shape` array that this process's devices hold,
    in the order `jax.make_array_from_process_local_data` expects them: the distinct row blocks
    of the addressable devices, by position in the global array. Not assumed contiguous."""
    blocks = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        for dim, part in enumerate(index[1:], 1):
            if part != slice(None) and (part.start or 0, part.stop) != (0, global_shape[dim]):
                raise ValueError(f"local_rows: dimension {dim} is sharded ({index}); only rows "
                                 "may be split across processes")
        rows = index[0] if index else slice(None)
        blocks.add(rows.indices(global_shape[0]))
    starts = sorted(blocks)
    for (_, stop, _), (start, _, _) in zip(starts, starts[1:], strict=False):
        if start < stop:
            raise ValueError(f"local_rows: overlapping row blocks {starts}")
    if not starts:
        return np.zeros(0, int)
    return np.concatenate([np.arange(a, b, s) for a, b, s in starts])
