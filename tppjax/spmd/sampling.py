"""Text from a trained checkpoint: restore onto any mesh, then sample token by token.

A prefill over the prompt fills a per-layer key/value cache (`models.transformer.KVCache`,
sharded like the keys and values: batch over the data axes, kv heads over `tensor`); then each
new token is one step that attends to the cache and appends its own keys and values. The
uncached path, which recomputes the whole sequence for every token, stays as the reference: the
greedy output of both is the same. The sequence lives in a fixed-size buffer (prompt + new
tokens), so one `jax.jit` compiles once; the loop over positions runs inside it
(`lax.fori_loop`). Positions past the current length hold padding (or zeros in the cache), but
attention is causal (masked), so the logits at position `length - 1` never see them.
"""

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.core import spmd as flax_spmd

from tppjax.errors import ConfigError
from tppjax.models import ModelConfig
from tppjax.spmd.checkpoint import ITEMS, STEP_PREFIX, CheckpointManager
from tppjax.spmd.mesh import make_mesh, parse_mesh_spec
from tppjax.spmd.rules import Rules, batch_shards
from tppjax.spmd.train_step import TrainConfig, Trainer


def _known(cls, saved: dict) -> dict:
    """The fields of `cls` in a saved record (a record from another version may hold more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in saved.items() if k in names}


def _check_length(length: int, cfg: ModelConfig) -> None:
    if length > cfg.max_seq_len:
        raise ConfigError(f"the prompt + --max-new-tokens is {length} tokens but the model's "
                          f"max_seq_len is {cfg.max_seq_len}; shorten them")


def _check_no_stage(mesh_spec: str) -> None:
    sizes = parse_mesh_spec(mesh_spec)
    if sizes["stage"] > 1 or sizes["context"] > 1:
        raise ConfigError(f"sampling runs the plain model: give a --mesh without stage or "
                          f"context (got {mesh_spec})")


def load(directory: str | Path, mesh_spec: str, seq_len: int | None, devices=None,
         step: int | None = None):
    """(trainer, params, run record) of checkpoint `step` (default the latest) in `directory`,
    on `mesh_spec`, for sequences of `seq_len` tokens (None: up to the model's max_seq_len,
    when the prompt's length in tokens is known only from the record's tokenizer).

    The trainer is built from the saved model and train config; the checkpoint is opened read
    only (a training run may still be writing there). Params are mesh-independent, so a run
    saved on any mesh, pipelined or not, restores here; the mesh must not have `stage` > 1.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ConfigError(f"--checkpoint-dir {directory}: no such folder")
    options = ocp.CheckpointManagerOptions(step_prefix=STEP_PREFIX, read_only=True,
                                           save_interval_steps=0, create=False)
    absl = logging.getLogger("absl")  # Orbax warns that a read-only directory is read only
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        raw = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    finally:
        absl.setLevel(level)
    try:
        probe = CheckpointManager(directory, raw, {})
        step = probe.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {directory}; train with --checkpoint-dir first")
        if step not in probe.all_steps():
            raise ConfigError(f"--step {step}: no checkpoint of that step in {directory}; saved "
                              f"steps: {probe.all_steps()}")
        info = probe.read_info(step)
        cfg = ModelConfig(**_known(ModelConfig, info["model"]))
        seq_len = cfg.max_seq_len if seq_len is None else seq_len
        _check_length(seq_len, cfg)
        # Sampling runs without pipeline stages: the run's stage split does not apply.
        tc = TrainConfig(**{**_known(TrainConfig, info["train"]), "grad_accum": 1,
                            "stage_layers": None})
        _check_no_stage(mesh_spec)
        mesh = make_mesh(mesh_spec, devices)
        rows = batch_shards(mesh.shape)
        trainer = Trainer(cfg, tc, mesh, Rules(), (rows, seq_len))
        params, _, info = CheckpointManager(directory, raw, info).restore(step, trainer)
    finally:
        raw.close()
    return trainer, params, info


def text_codec(info: dict, vocab_size: int):
    """(text → token ids, ids → text) of a checkpoint's run: through the tokenizer.json its
    record holds (the one train.py --tokenizer read), else bytes."""
    if info.get("tokenizer") is None:
        return lambda text: encode(text, vocab_size), decode
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(info["tokenizer"])

    def to_ids(text: str) -> np.ndarray:  # as the training data: no special tokens
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
        if ids.size == 0:
            raise ConfigError("--prompt is empty; give at least one character")
        return ids

    return to_ids, lambda tokens: tokenizer.decode([int(t) for t in tokens])


def encode(text: str, vocab_size: int) -> np.ndarray:
    """Byte-level tokens of `text` (UTF-8)."""
    tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if tokens.size == 0:
        raise ConfigError("--prompt is empty; give at least one character")
    if tokens.max() >= vocab_size:
        raise ConfigError(f"the prompt holds byte {tokens.max()} but the model's vocab_size is "
                          f"{vocab_size}: it was not trained on bytes")
    return tokens


def decode(tokens) -> str:
    """Bytes → text; ids above 255 and invalid UTF-8 become U+FFFD."""
    return bytes(int(t) if t < 256 else 0xFF for t in tokens).decode("utf-8", errors="replace")


def open_hf(path: str | Path, mesh_spec: str, text: str, new_tokens: int):
    """(trainer, params, prompt tokens, tokens → text) for the Hugging Face folder at `path`.

    Text goes through the folder's `tokenizer.json` (the `tokenizers` package) when it has one;
    without one, the prompt is token ids ("1 2 3") and so is the output. Everything is checked
    against config.json before the weights load (`spmd.hf.open_model`, which places each shard
    directly on its device).
    """
    from tppjax.models.hf import Folder  # safetensors and tokenizers: needed for HF folders only
    from tppjax.spmd.hf import open_model

    with Folder(path) as folder:
        cfg = folder.cfg
    tokenizer_file = Path(path) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ConfigError(f"{tokenizer_file} is not a tokenizers file ({err}); fix or "
                              "remove it") from err
        prompt = np.asarray(tokenizer.encode(text).ids, np.int32)

        def detokenize(tokens) -> str:
            return tokenizer.decode([int(t) for t in tokens])
    else:
        try:
            prompt = np.asarray([int(t) for t in text.split()], np.int32)
        except ValueError:
            raise ConfigError(f"--prompt {text!r}: {path} has no tokenizer.json, so give token "
                              'ids, e.g. "1 2 3"') from None

        def detokenize(tokens) -> str:
            return " ".join(str(int(t)) for t in tokens)
    if prompt.size == 0:
        raise ConfigError("--prompt is empty; give at least one token")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ConfigError(f"--prompt holds token ids {prompt.min()}..{prompt.max()} but {path} "
                          f"has a vocabulary of {cfg.vocab_size}; give ids below it")
    _check_length(prompt.size + new_tokens, cfg)
    _check_no_stage(mesh_spec)
    trainer, params = open_model(path, mesh_spec, prompt.size + new_tokens)
    return trainer, params, prompt, detokenize


def check_sampling(temperature: float, top_k: int) -> None:
    """A NaN, infinite or negative temperature (or a negative top-k) is one line, before any
    model is loaded."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got "
                          f"{temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")


def _check(cfg: ModelConfig, prompt_size: int, new_tokens: int, temperature: float,
           top_k: int) -> None:
    _check_length(prompt_size + new_tokens, cfg)
    check_sampling(temperature, top_k)


def _sampler(trainer: Trainer, prompt_size: int, length: int, temperature: float, top_k: int,
             cache: bool):
    """The jitted loop (params, buffer, key) → buffer with positions prompt_size .. length - 1
    sampled. Step `pos` needs the logits of the token at pos - 1: uncached, from the whole
    buffer; cached, from that one token against the KV cache, which a prefill over the prompt
    (all but its last token, which the first step feeds) has filled. The key is split the same
    way in both, so they sample the same tokens, not only greedily."""
    top_k = min(top_k, trainer.cfg.vocab_size)

    def pick(logits, key):  # (rows, V) → (rows,)
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    # Sequence parallelism splits T over `tensor`: a one-token step has nothing to split.
    rules = dataclasses.replace(trainer.rules, sequence_parallel=False).activations

    def run(params, buffer, key):
        with flax_spmd.logical_axis_rules(rules):
            model = nnx.merge(trainer.graphdef, params)
            kv = None
            if cache:
                kv = model.empty_cache(buffer.shape[0], length)
                if prompt_size > 1:
                    kv = model.decode(buffer[:, : prompt_size - 1], kv, 0)[1]

            def body(pos, carry):
                buffer, kv, key = carry
                key, sub = jax.random.split(key)
                if kv is None:
                    logits = jax.lax.dynamic_index_in_dim(model(buffer), pos - 1, 1, False)
                else:
                    last = jax.lax.dynamic_slice_in_dim(buffer, pos - 1, 1, axis=1)
                    logits, kv = model.decode(last, kv, pos - 1)
                    logits = logits[:, 0]
                buffer = jax.lax.dynamic_update_index_in_dim(buffer, pick(logits, sub)[:, None],
                                                             pos, 1)
                return buffer, kv, key

            return jax.lax.fori_loop(prompt_size, length, body, (buffer, kv, key))[0]

    return jax.jit(run)


def _buffer(trainer: Trainer, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """(rows, prompt + new_tokens) tokens, the prompt in every row: one row per data shard."""
    rows = batch_shards(trainer.mesh.shape)
    buffer = np.zeros((rows, prompt.size + new_tokens), np.int32)
    buffer[:, : prompt.size] = prompt
    return buffer


def generate(trainer: Trainer, params, prompt: np.ndarray, new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             cache: bool = True) -> np.ndarray:
    """(rows, len(prompt) + new_tokens) tokens: the prompt then the samples, one row per data
    shard (rows sample independently). Greedy when `temperature` is 0, else softmax of
    logits / temperature restricted to the `top_k` most likely tokens (0: all). `cache=False`
    recomputes the whole sequence for every token: the reference the KV cache must match."""
    _check(trainer.cfg, prompt.size, new_tokens, temperature, top_k)
    buffer = _buffer(trainer, prompt, new_tokens)
    run = _sampler(trainer, prompt.size, buffer.shape[1], temperature, top_k, cache)
    with jax.set_mesh(trainer.mesh):
        out = run(params, trainer.place(buffer), jax.random.key(seed))
    return np.asarray(jax.device_get(out))


def generation_speed(trainer: Trainer, params, prompt_len: int = 16, new_tokens: int = 256,
                     repeats: int = 2) -> dict[str, float]:
    """Greedy new tokens per second (all rows together), with and without the KV cache, after
    compiling (the best of `repeats` runs each). The prompt is `prompt_len` fixed tokens."""
    _check(trainer.cfg, prompt_len, new_tokens, 0.0, 0)
    prompt = np.arange(prompt_len, dtype=np.int32) % trainer.cfg.vocab_size
    buffer = _buffer(trainer, prompt, new_tokens)
    speed = {}
    with jax.set_mesh(trainer.mesh):
        args = (params, trainer.place(buffer), jax.random.key(0))
        for name, cache in (("cached", True), ("uncached", False)):
            run = _sampler(trainer, prompt_len, buffer.shape[1], 0.0, 0, cache)
            compiled = run.lower(*args).compile()
            best = float("inf")
            for _ in range(repeats):
                begin = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                best = min(best, time.perf_counter() - begin)
            speed[f"{name}_tokens_per_s"] = buffer.shape[0] * new_tokens / best
    return speed
