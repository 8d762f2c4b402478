"""Generation with a KV cache: the same tokens as recomputing the whole sequence, on one device
and on a data x tensor mesh, for both model styles; the cache sharded like the keys and values."""

import dataclasses
import functools
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tppjax.cli import sample
from tppjax.measure import analysis, hlo
from tppjax.models import build_config
from tppjax.spmd.checkpoint import CheckpointManager, run_info
from tppjax.spmd.sampling import _buffer, _sampler, generate, generation_speed
from tppjax.spmd.train_step import TrainConfig

from .helpers import trainer

# 4 kv heads so that tensor=4 splits them. Weights this large give varied greedy text: at the
# default init_std gpt2 repeats the last prompt token forever, which would hide position bugs.
PROMPT, NEW = np.array([3, 1, 4, 1, 5], np.int32), 10
MESHES = ("single", "data=2,tensor=4")
FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def config(style: str):
    return build_config("tiny", style=style, n_heads=8, n_kv_heads=4, init_std=0.5)


@functools.cache
def initial(style: str):
    """Host (params, opt_state), initialised once per style for every test here."""
    return jax.device_get(trainer(config(style), "single", shape=(1, 16)).init(0))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    """(style, host params), placed on each mesh by the tests."""
    return request.param, initial(request.param)[0]


def on_mesh(cfg, params, mesh_spec):
    tr = trainer(cfg, mesh_spec, shape=(2 if mesh_spec != "single" else 1, 16))
    return tr, jax.device_put(params, tr.param_shardings)


def test_greedy_cached_matches_uncached(model):
    """Token-identical on every mesh: the uncached single-device output is the reference, and
    every data shard's row is the same (they share the prompt)."""
    style, host = model
    assert_cached_matches_uncached(config(style), host)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_greedy_cached_matches_uncached_in_bfloat16(style):
    """The same in bfloat16 compute (float32 weights): the cache holds bf16 keys and values."""
    cfg = dataclasses.replace(config(style), compute_dtype="bfloat16")
    assert_cached_matches_uncached(cfg, initial(style)[0])


def assert_cached_matches_uncached(cfg, host):
    reference = None
    for mesh_spec in MESHES:
        tr, params = on_mesh(cfg, host, mesh_spec)
        uncached = generate(tr, params, PROMPT, NEW, cache=False)
        cached = generate(tr, params, PROMPT, NEW)
        reference = uncached[0] if reference is None else reference
        assert len(set(reference[PROMPT.size:])) > 3, reference  # varied: positions matter
        for row in (*uncached, *cached):
            np.testing.assert_array_equal(row, reference,
                                          err_msg=f"{cfg.style} {cfg.compute_dtype} {mesh_spec}")


def test_cache_is_sharded_over_batch_and_kv_heads(model):
    """After the prefill, each device holds 1/data of the rows and 1/tensor of the kv heads."""
    style, host = model
    tr, params = on_mesh(config(style), host, "data=2,tensor=4")
    from flax import nnx
    from flax.core import spmd as flax_spmd

    def prefill(params, tokens):
        with flax_spmd.logical_axis_rules(tr.rules.activations):
            model = nnx.merge(tr.graphdef, params)
            return model.decode(tokens, model.empty_cache(2, 8), 0)[1]

    with jax.set_mesh(tr.mesh):
        cache = jax.jit(prefill)(params, tr.place(np.tile(PROMPT, (2, 1))))
    cfg = tr.cfg
    for a in cache:
        assert a.shape == (cfg.n_layers, 2, 8, cfg.n_kv_heads, cfg.head_dim)
        assert a.sharding.shard_shape(a.shape) == (cfg.n_layers, 1, 8, cfg.n_kv_heads // 4,
                                                   cfg.head_dim)


def test_kv_cache_does_a_tokens_work_per_token():
    """Read from the compiled programs (matmul FLOPs, loop trip counts included), not timed.
    Without the cache each of the N new tokens re-runs the model over the whole buffer of S =
    prompt + N positions: N forward passes of S tokens. With it, the prefill runs the P − 1
    prompt tokens before the last (its logits unused, so without the head) and each step one
    token, each attending to the S cached positions: (P − 1 + N) tokens' work in all, about 1/S
    of the uncached. A cached step that recomputed the prefix would cost the uncached's."""
    cfg = config("llama")
    tr, params = on_mesh(cfg, initial("llama")[0], "single")
    buffer = _buffer(tr, PROMPT, NEW)
    rows, length = buffer.shape
    dots = {}
    with jax.set_mesh(tr.mesh):
        for cache in (True, False):
            run = _sampler(tr, PROMPT.size, length, 0.0, 0, cache)
            text = run.lower(params, tr.place(buffer), jax.random.key(0)).compile().as_text()
            dots[cache] = sum(f.flops * f.count for f in hlo.flops(text) if f.kind == "dot")
    # One forward pass over the whole buffer, per token 2N + 4·L·h·S (PaLM's 6N + 12·L·h·s
    # of a train step, less its backward: a third).
    forward = analysis.model_flops(cfg, rows, length) / 3
    head = 2 * rows * analysis.param_counts(cfg)["head_tp"]  # per token
    assert dots[False] == pytest.approx(NEW * forward, rel=1e-6), dots
    tokens = PROMPT.size - 1 + NEW
    want = tokens / length * forward - (PROMPT.size - 1) * head
    assert dots[True] == pytest.approx(want, rel=1e-6), dots


def test_generation_speed_reports_both_paths():
    tr, params = on_mesh(config("llama"), initial("llama")[0], "single")
    speed = generation_speed(tr, params, prompt_len=4, new_tokens=4, repeats=1)
    assert set(speed) == {"cached_tokens_per_s", "uncached_tokens_per_s"}
    assert all(v > 0 for v in speed.values())


def test_sample_script_cache_and_no_cache(tmp_path, capsys):
    """sample.py from a checkpoint: the default (KV cache) and --no-cache print the same text,
    sampled, not only greedy (both paths split the key alike); more tokens than the model's
    max_seq_len is one line, exit 2."""
    cfg = config("llama")
    with CheckpointManager.open(tmp_path, run_info(cfg, TrainConfig(), "data=1", 0)) as ckpt:
        ckpt.save(0, *initial("llama"))
    args = ["--checkpoint-dir", str(tmp_path), "--prompt", "def f(", "--max-new-tokens", "8",
            "--temperature", "1", "--top-k", "20"]
    texts = []
    for extra in ([], ["--no-cache"]):
        assert sample.main(args + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def f(")
    assert sample.main(args[:-5] + ["60"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "max_seq_len is 64" in err[0], err


def test_sample_script_hf_folder(tmp_path, capsys):
    """sample.py --model: Llama through its tokenizer.json, cached and --no-cache the same
    text; a GPT-2 folder without tokenizer.json takes and prints token ids, and a prompt that
    is not ids is one line, exit 2."""
    llama = ["--model", str(FIXTURES / "llama"), "--prompt", "def f(", "--max-new-tokens", "6",
             "--temperature", "0"]
    texts = []
    for extra in ([], ["--no-cache"]):
        assert sample.main(llama + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def f(")

    bare = tmp_path / "gpt2"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "gpt2" / name, bare)
    gpt2 = ["--model", str(bare), "--max-new-tokens", "6", "--temperature", "0"]
    assert sample.main(gpt2 + ["--prompt", "1 2 3"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[:3] == ["1", "2", "3"] and len(ids) == 9
    assert sample.main(gpt2 + ["--prompt", "def f("]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt 'def f(':"), err
