"""Named device meshes from a spec such as `data=2,stage=2,tensor=2`.

Every mesh has all five axes, in this order (missing ones have size 1), so the rules table and
the pipeline can always name them. `tensor` is innermost: its collectives are the most frequent,
so it gets the closest devices (same host, fastest links); `context` (ring attention's sends,
once per layer) comes next.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from tppjax.errors import ConfigError

AXES = ("data", "fsdp", "stage", "context", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data=2,tensor=4"` → `{"data": 2, "fsdp": 1, "stage": 1, "context": 1, "tensor": 4}`."""
    sizes, seen = dict.fromkeys(AXES, 1), set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ConfigError(
                f"unknown mesh axis {name!r} in --mesh {spec!r}; axes are {', '.join(AXES)}"
            )
        if name in seen:  # the last would silently win
            raise ConfigError(f"mesh axis {name} is given twice in --mesh {spec!r}; give it once")
        seen.add(name)
        if not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(
                f"mesh axis {name} needs a positive integer size, got {value!r} in --mesh {spec!r}"
            )
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh with Auto axes over `devices` (default: all devices).

    Auto, not Explicit (jax 0.10's default): the compiler propagates shardings from the
    parameters and from the `with_sharding_constraint`s placed at Megatron's points, which lets
    a vocab-sharded embedding gather and a scan over stacked layers compile as they are. The
    parallel layout is then stated in exactly one place, `spmd.rules`.
    """
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**dict.fromkeys(AXES, 1), **spec}
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in AXES)
    if int(np.prod(shape)) != len(devices):
        text = ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "data=1"
        raise ConfigError(
            f"mesh {text} needs {int(np.prod(shape))} devices but {len(devices)} are available; "
            f"make the axis sizes multiply to {len(devices)} (e.g. --mesh data={len(devices)})"
            " or change --cpu-devices"
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def default_mesh(cfg, devices: int) -> str:
    """The mesh a run gets without --mesh: `tensor` the largest of 4, 2, 1 that divides the
    heads, the kv heads and the device count, the rest `data` (small on 8 devices:
    data=2,tensor=4). It follows the model, so that every preset runs with no --mesh."""
    tensor = next(t for t in (4, 2, 1)
                  if cfg.n_heads % t == cfg.n_kv_heads % t == devices % t == 0)
    return f"data={devices // tensor},tensor={tensor}"


def describe(mesh: Mesh) -> str:
    """`data=2 x tensor=4 (8 cpu devices)`."""
    axes = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1] or ["single device"]
    return f"{' x '.join(axes)} ({mesh.size} {mesh.devices.flat[0].platform} devices)"
