"""Uneven stages: how many layers each virtual stage holds, and the padded stack that keeps the
layers sharded over `stage` when they do not split evenly.

Symbols: L layers, p stages, v chunks per stage, n = p·v virtual stages; virtual stage k holds
`counts[k]` consecutive layers (model order). The parameters stay one stack on the `layers`
axis, split contiguously over `stage` (spmd.rules), so every virtual stage gets the same number
of slots, k = max(counts): virtual stage j's layers sit in slots j·k .. j·k + counts[j] − 1,
and the slots after them are padding. A padding slot holds zeros, and a pre-norm residual block
with zero weights and biases is exactly the identity (x + 0), so the padded stack computes the
same function anywhere it is run whole (sampling); the training executor and GPipe's forward
skip padding slots altogether (`active`: a `lax.cond` per slot, `pipeline.actions` runs each
real slot's own vjp so that the stash holds no copy of the weights), so they cost no FLOPs and
get exactly zero gradients, which keeps them zero under AdamW (and out of the gradient norm).
Checkpoints, Hugging Face export and parameter counts use the unpadded [L] stack (`unpad`).
Why padding and not one stack per stage: a per-stage stack of different lengths cannot be one
array sharded over `stage`, and the executor's one `shard_map` needs exactly that.

Chunks (v > 1): `to_virtual_stages` moves each virtual stage's layers to the stage and chunk
the schedule's placement gives it (`chunk_moves`). `check_fit` refuses, in one line, layers,
micro-batches or mesh axes that do not fit a schedule.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tppjax.errors import ConfigError
from tppjax.pipeline.schedules import Schedule

# The named scope of a layer that runs in a stack with padding slots (skipped by a `lax.cond`):
# the compiled program counts both branches on every slot, so `tppjax.measure.census` weights
# the ops in this scope by the real layers only.
ACTIVE_SCOPE = "active_layer"


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Real layers per virtual stage (model order), and the padded slots that hold them."""

    counts: tuple[int, ...]

    @property
    def slots_per_stage(self) -> int:  # per virtual stage
        return max(self.counts)

    @property
    def slots(self) -> int:
        return len(self.counts) * self.slots_per_stage

    @property
    def n_layers(self) -> int:
        return sum(self.counts)

    @property
    def padded(self) -> bool:
        return self.slots != self.n_layers

    def active(self) -> np.ndarray:
        """[virtual stages, slots per stage] bools: does the slot hold a real layer?"""
        return np.arange(self.slots_per_stage)[None, :] < np.asarray(self.counts)[:, None]

    def slot_of_layer(self) -> np.ndarray:
        """[L] ints: the slot that holds each layer."""
        return np.flatnonzero(self.active().reshape(-1))

    def pad(self, stacked):
        """[L, ...] → [slots, ...], zeros in the padding slots."""
        where = self.slot_of_layer()
        return jax.tree.map(
            lambda a: jnp.zeros((self.slots, *a.shape[1:]), a.dtype).at[where].set(a), stacked)

    def unpad(self, stacked):
        """[slots, ...] → [L, ...]."""
        where = self.slot_of_layer()
        return jax.tree.map(lambda a: a[where], stacked)

    def ranges(self) -> list[range]:
        """Per virtual stage, its layers (model indices)."""
        ends = np.cumsum((0, *self.counts))
        return [range(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def balance(n_layers: int, n_virtual: int, last_extra: float,
            device_of: list[int] | None = None) -> tuple[int, ...]:
    """Layers per virtual stage that keep the busiest device's cost low: a device's cost is
    the layers of the virtual stages it holds (`device_of[k]`: the stage holding virtual stage
    k; default one each), plus `last_extra` layers' worth for the head on the last virtual
    stage. Greedy: each layer goes where it leaves the smallest largest device cost, then the
    smallest cost of its own device, then the fewest slots per virtual stage (padding), then
    nearest the middle, so the first and last virtual stages get fewer (the last carries the
    head, the first the embedding's gradient and, in 1F1B-like schedules, the most
    micro-batches in flight). With V placement the middle virtual stages share a device."""
    device_of = list(range(n_virtual)) if device_of is None else list(device_of)
    counts = [0] * n_virtual
    extra = [0.0] * n_virtual
    extra[-1] += last_extra
    middle = (n_virtual - 1) / 2

    def after(k):
        new = counts[:k] + [counts[k] + 1] + counts[k + 1:]
        load = {d: 0.0 for d in device_of}
        for j, d in enumerate(device_of):
            load[d] += new[j] + extra[j]
        return max(load.values()), load[device_of[k]], max(new), abs(k - middle), k

    for _ in range(n_layers):
        counts[min(range(n_virtual), key=after)] += 1
    return tuple(counts)


def parse_stage_layers(text: str | None) -> tuple[int, ...] | str | None:
    """--stage-layers: None (even if it divides, else balanced), "auto", or "1,2,2,1"."""
    if text is None or text == "auto":
        return text
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise ConfigError(f"--stage-layers {text!r}: give layers per virtual stage as "
                          "non-negative integers, like 1,2,2,1, or 'auto'")
    return counts


def chunk_moves(schedule: Schedule) -> list[list[tuple[int, int, int, int]]]:
    """How `to_virtual_stages` fills the chunks that live on another stage in the canonical
    layout (layers split contiguously over `stage`: stage s holds virtual stages s·v ..
    s·v + v − 1 as its local chunks 0 .. v − 1). Rounds of moves (source stage, its local
    chunk, stage, chunk), each stage sending and receiving at most one chunk per round: one
    `ppermute` each. Rounds are filled greedily, so there are at most 2Δ − 1 of them for Δ the
    most chunks one stage sends or receives (Δ for the placements here: one for V at p = 2,
    two for looped p = 4, v = 2)."""
    p, v = schedule.stages, schedule.virtual_stages
    rounds: list[list[tuple[int, int, int, int]]] = []
    for s in range(p):
        for c in range(v):
            k = schedule.virtual_stage(s, c)
            if k // v == s:
                continue
            move = (k // v, k % v, s, c)
            free = (r for r in rounds if all(move[0] != o[0] and s != o[2] for o in r))
            round_ = next(free, None)
            if round_ is None:
                rounds.append([move])
            else:
                round_.append(move)
    return rounds


def to_virtual_stages(stacked, schedule: Schedule, stage_axis: str = "stage"):
    """[L, ...] → [p, v, L/(v·p), ...]: chunk c of stage s holds the layers of virtual stage
    `schedule.virtual_stage(s, c)` (looped: c·p + s; V: s, then 2p − 1 − s).

    The chunks that live on other stages arrive in the rounds of `chunk_moves`, one `ppermute`
    each; their gradients go back by its transpose. Measured: letting XLA reshard a reordered
    [v, p, ...] instead moved 2x the stage's weights each way at p = 4, v = 2 (looped; this:
    1x) and 3.5x the looped amount for V at p = 2 (this: the same as looped)."""
    p, v = schedule.stages, schedule.virtual_stages
    here = np.array([[schedule.virtual_stage(s, c) for c in range(v)] for s in range(p)])
    own = np.where(here // v == np.arange(p)[:, None], here % v, v)  # v: arrives from elsewhere
    rounds = []
    for moves in chunk_moves(schedule):
        send, land = np.zeros(p, np.int32), np.full(p, v, np.int32)
        for src, j, dst, c in moves:
            send[src], land[dst] = j, c
        rounds.append(([(src, dst) for src, _, dst, _ in moves], send, land))

    @functools.partial(jax.shard_map, in_specs=P(stage_axis), out_specs=P(stage_axis),
                       axis_names={stage_axis})
    def place(local):
        s = jax.lax.axis_index(stage_axis)

        def one(a):
            a = a.reshape(v, a.shape[0] // v, *a.shape[1:])
            padded = jnp.concatenate([a, jnp.zeros_like(a[:1])])
            out = [padded[jnp.asarray(own)[s, c]] for c in range(v)]
            for pairs, send, land in rounds:
                got = jax.lax.ppermute(a[jnp.asarray(send)[s]], stage_axis, pairs)
                out = [o + jnp.where(jnp.asarray(land)[s] == c, got, 0) for c, o in enumerate(out)]
            return jnp.stack(out)[None]

        return jax.tree.map(one, local)

    return place(stacked)


def check_fit(schedule: Schedule, n_layers: int, n_microbatches: int, layout: StageLayout | None,
              stage_axis: str, data_axes: tuple[str, ...]) -> None:
    """One-line `ConfigError`s for a pipeline's inputs (`pipeline.executor.pipelined_loss`) that
    do not fit the schedule or the mesh: n_layers layers (stage_layers: `layout`), the
    micro-batches, the stage and data axes."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual_stages
    mesh = dict(jax.sharding.get_abstract_mesh().shape)
    missing = [a for a in data_axes if a not in mesh]
    if layout is not None and min(layout.counts) < 0:
        raise ConfigError(f"stage_layers {list(layout.counts)} has a negative count; give "
                          "layers per virtual stage, 0 or more")
    if layout is None:
        fits = n_layers % (p * v) == 0
        fix = "change the layers or the schedule, or give stage_layers"
    else:
        fits = len(layout.counts) == p * v and n_layers in (layout.n_layers, layout.slots)
        fix = (f"give {p * v} stage_layers (stages x virtual stages) that sum to {n_layers}, or "
               f"a stack padded to {p * v} x their largest")
    for bad, message in (
            (n_microbatches != m, f"xs holds {n_microbatches} micro-batches but the schedule "
                               f"{schedule.name} runs {m}; micro-batch the inputs into {m}"),
            (mesh.get(stage_axis) != p, f"the schedule {schedule.name} has {p} stages but the "
                                        f"mesh's {stage_axis!r} axis is {mesh.get(stage_axis)}; "
                                        "make them equal, or name the stage axis with "
                                        "stage_axis="),
            (bool(missing), f"the mesh has no axis {missing[0] if missing else ''!r}; name "
                            f"the mesh axes that split the batch with data_axes= (mesh axes: "
                            f"{', '.join(mesh)})"),
            (not fits, f"{n_layers} layers do not split into {p} stages x {v} virtual stages"
                       f"{'' if layout is None else ' as ' + str(list(layout.counts))}; {fix}")):
        if bad:
            raise ConfigError(message)
