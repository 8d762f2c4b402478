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
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tppjax.errors import ConfigError

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
