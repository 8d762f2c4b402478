"""Hugging Face folders on a mesh: every parameter placed directly in its sharded layout.

`fine_tune_config` is a folder's model for a training run, the user's model settings checked
against it.

`jax.make_array_from_callback` asks, per device, for the block of the global array that device
holds (the `Trainer`'s parameter shardings, i.e. `spmd.rules`); the callback reads just that
block from the memory-mapped safetensors (`models.hf`). No device and no host buffer ever holds
a full copy of a sharded tensor. A replicated parameter is read once per device that holds it.
"""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from tppjax.errors import ConfigError
from tppjax.models.config import ModelConfig
from tppjax.models.hf import Folder, layout, save
from tppjax.spmd.mesh import make_mesh, parse_mesh_spec
from tppjax.spmd.rules import Rules, batch_shards
from tppjax.spmd.train_step import TrainConfig, Trainer


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def fine_tune_config(path: str, given: dict[str, tuple[str, object]], *,
                     preset: str | None = None, seq_len: int | None = None,
                     compute_dtype: str = "float32") -> ModelConfig:
    """The model of the folder at `path` (--init-from-hf) for a run that trains it.

    Its shape comes from path/config.json, so a setting in `given` (ModelConfig field → (the
    flag as the user gave it, its value)) that says otherwise is refused; one that agrees is
    fine. Two set no shape and may differ: vocab_multiple (padding) and, for Llama,
    max_seq_len (only a limit: rotary positions have no table; GPT-2's n_positions is the rows
    of its position table). A `seq_len` past the positions is refused with the fix that works
    for the folder's kind of model; a `preset` is refused (the folder is the model)."""
    values = {field: value for field, (_, value) in given.items()}
    padding = {"vocab_multiple": values["vocab_multiple"]} if "vocab_multiple" in values else {}
    with Folder(path, compute_dtype=compute_dtype, **padding) as folder:
        cfg = folder.cfg
    if preset is not None:
        raise ConfigError(f"--preset conflicts with --init-from-hf {path} (the model comes from "
                          "its config.json); drop --preset")
    llama, positions, limit = cfg.style == "llama", cfg.max_seq_len, values.get("max_seq_len")
    if llama and limit:
        cfg = dataclasses.replace(cfg, max_seq_len=limit)
    for field, (text, value) in given.items():
        if value != getattr(cfg, field):
            raise ConfigError(f"{text} conflicts with {path}/config.json "
                              f"({field}={getattr(cfg, field)!r}); the model shape comes from "
                              "--init-from-hf: drop the flag")
    if seq_len is not None and seq_len > cfg.max_seq_len:  # else check_run_flags fits it
        why = (f"--max-seq-len {cfg.max_seq_len}" if llama and limit
               else f"max_position_embeddings={positions} of {path}" if llama
               else f"n_positions={positions} of {path}, the rows of its learned position "
                    "table")
        fix = f", or pass --max-seq-len {seq_len} to train past it" if llama else ""
        raise ConfigError(f"--seq-len {seq_len} is longer than the {cfg.max_seq_len} positions "
                          f"the model has ({why}); give --seq-len {cfg.max_seq_len} or "
                          f"less{fix}")
    return cfg


def load_params(folder: Folder, trainer: Trainer) -> nnx.State:
    """The folder's weights as `trainer`'s canonical parameter state (`Trainer.to_canonical`:
    the [L] blocks), each array sharded as the trainer wants it."""
    nodes = layout(trainer.cfg, folder.prefix)
    folder.check(nodes)

    def place(path, var):
        node = nodes[_key(path)]
        array = jax.make_array_from_callback(node.shape, var.get_value(),
                                             lambda index: node.read(folder, index))
        return var.replace(array)

    return jax.tree.map_with_path(place, trainer.canonical_shardings[0],
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_state(path: str | Path, trainer: Trainer):
    """(params, opt_state, what was loaded) to fine-tune from the folder at `path`:
    `Trainer.init`'s pair, with the weights read from the folder instead of drawn from a seed,
    and `Folder.summary()` for the run's log."""
    with Folder(path) as folder, jax.set_mesh(trainer.mesh):
        params = load_params(folder, trainer)
        opt_state = jax.jit(trainer.tx.init,
                            out_shardings=trainer.canonical_shardings[1])(params)
        return *trainer.from_canonical(params, opt_state), folder.summary()


def open_model(path: str | Path, mesh_spec: str, seq_len: int):
    """(trainer, params) of the folder at `path` on `mesh_spec`, over the first devices (the
    mesh may use fewer than there are). The trainer takes one row per data shard."""
    devices = jax.devices()[: math.prod(parse_mesh_spec(mesh_spec).values())]
    with Folder(path) as folder:
        mesh = make_mesh(mesh_spec, devices)
        rows = batch_shards(mesh.shape)
        trainer = Trainer(folder.cfg, TrainConfig(), mesh, Rules(), (rows, seq_len))
        return trainer, trainer.from_canonical(load_params(folder, trainer))[0]


def logits(trainer: Trainer, params, tokens: np.ndarray) -> np.ndarray:
    """(T, vocab_size) float32 logits of one token sequence, padded vocabulary dropped.

    The plain forward (embed, scan over the stacked layers, head), also on a mesh with
    `stage` > 1: the layers stay where they are and the compiler moves what it needs; the
    pipeline schedules are for training."""
    rows = batch_shards(trainer.mesh.shape)
    batch = trainer.place(np.tile(np.asarray(tokens, np.int32)[None], (rows, 1)))

    def forward(params, batch):
        with flax_spmd.logical_axis_rules(trainer.rules.activations):
            return nnx.merge(trainer.graphdef, params)(batch)[0, :, : trainer.cfg.vocab_size]

    with jax.set_mesh(trainer.mesh):
        return np.asarray(jax.device_get(jax.jit(forward)(params, batch)))


def check_new_folder(out: str | Path, checkpoint_dir: str | Path | None = None) -> None:
    """Export writes only into a new or empty folder: nothing the user saved is overwritten;
    and not inside `checkpoint_dir`, the run it exports (a folder there breaks the next
    --resume)."""
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--out {folder} already exists and is not an empty folder; give a "
                          "new folder (nothing there is overwritten)")
    if checkpoint_dir is None:
        return
    inside, ckpt = folder.resolve(), Path(checkpoint_dir).resolve()
    if inside == ckpt or ckpt in inside.parents:
        raise ConfigError(f"--out {out} is inside --checkpoint-dir {checkpoint_dir}; "
                          "give a folder outside it")


def export(cfg, params: nnx.State, out: str | Path, tokenizer: str | None = None) -> None:
    """Write `params` as an HF folder at `out` (float32, unpadded vocabulary), gathering one
    parameter at a time to the host, with `tokenizer` (the text of the tokenizer.json the run
    trained through, if any) beside them; refuses a non-empty `out`."""
    check_new_folder(out)
    arrays = {_key(path): var.get_value() for path, var in nnx.to_flat_state(params)}
    try:
        save(out, cfg, lambda key: jax.device_get(arrays[key]))
        if tokenizer is not None:
            (Path(out) / "tokenizer.json").write_text(tokenizer)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write ({err.strerror}); give a writable "
                          "folder") from err
