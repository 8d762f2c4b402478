"""Hugging Face folders in and out: logits against `transformers`' own (fixtures made by
scripts/make_hf_fixtures.py, no network, no torch), on one device and on meshes; export then
import is exact; a sharded index loads; each device reads only its shard; bad folders are one
line; train.py fine-tunes from a folder and scripts/hf.py exports the checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tppjax.cli import hf as hf_script
from tppjax.cli import train as train_script
from tppjax.errors import ConfigError
from tppjax.models.hf import Folder, config_from_hf, layout, load_tokenizer
from tppjax.spmd import hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
STYLES = ("llama", "gpt2")
# float32 on both sides, only the order of operations differs from torch: measured 5e-7..8e-7.
RTOL = 1e-4


def reference(style: str) -> tuple[np.ndarray, np.ndarray]:
    ref = json.loads((FIXTURES / style / "reference.json").read_text())
    return np.asarray(ref["tokens"]), np.asarray(ref["logits"], np.float32)


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(params)}


def one_line_error(capfd, code, *expect):
    """Exit 2, exactly one stderr line (`error: ...`) holding every string in `expect`."""
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(e in lines[0] for e in expect), lines[0]


@pytest.mark.parametrize("mesh", ["data=1", "tensor=8", "data=2,stage=2,tensor=2"])
@pytest.mark.parametrize("style", STYLES)
def test_logits_match_transformers(style, mesh):
    tokens, want = reference(style)
    trainer, params = hf.open_model(FIXTURES / style, mesh, len(tokens))
    placed = jax.tree.leaves(params)
    assert [a.sharding for a in placed] == jax.tree.leaves(trainer.param_shardings)
    got = hf.logits(trainer, params, tokens)
    assert got.shape == want.shape == (len(tokens), trainer.cfg.vocab_size)
    assert rel_err(got, want) < RTOL, f"{style} on {mesh}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("style", STYLES)
def test_export_then_import_is_exact(style, tmp_path):
    """The exported tensors are the folder's own (Llama's bf16 upcast exactly, vocab unpadded,
    a tied GPT-2 head not stored), and reading them back gives the same params bit for bit."""
    trainer, params = hf.open_model(FIXTURES / style, "data=1", 8)
    hf.export(trainer.cfg, params, tmp_path / "out")
    original = load_file(FIXTURES / style / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, array in original.items():
        assert exported[name].dtype == np.float32
        np.testing.assert_array_equal(exported[name], array.astype(np.float32), err_msg=name)
    with Folder(tmp_path / "out") as folder:
        assert folder.cfg == trainer.cfg
    again = flat(hf.open_model(tmp_path / "out", "fsdp=2,tensor=4", 8)[1])
    for name, array in flat(params).items():
        np.testing.assert_array_equal(again[name], array, err_msg=name)


def test_sharded_index_loads(tmp_path):
    """model-0000k-of-00002.safetensors + model.safetensors.index.json, as transformers shards."""
    tensors = load_file(FIXTURES / "llama" / "model.safetensors")
    names = sorted(tensors)
    files = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in files.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in files.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path)
    tokens, want = reference("llama")
    trainer, params = hf.open_model(tmp_path, "tensor=8", len(tokens))
    assert rel_err(hf.logits(trainer, params, tokens), want) < RTOL


@pytest.mark.parametrize("style", STYLES)
def test_each_device_reads_only_its_shard(monkeypatch, style):
    """Counted at the safetensors slice: no device's callback reads more elements than the
    shard it returns, and all devices together read each stored element once per device that
    holds it (a replicated gain once per replica, the zero vocab padding never)."""
    reads = []  # (HF tensor name, elements read)
    read, make_array = Folder.read, jax.make_array_from_callback

    def counting_read(self, name, index):
        out = read(self, name, index)
        reads.append((name, out.size))
        return out

    def spy(shape, sharding, callback):
        def counted(index):
            before = len(reads)
            block = callback(index)
            done = sum(size for _, size in reads[before:])
            assert done <= block.size, (shape, index, done, block.size)
            return block

        return make_array(shape, sharding, counted)

    monkeypatch.setattr(Folder, "read", counting_read)
    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    trainer, params = hf.open_model(FIXTURES / style, "fsdp=2,tensor=4", 8)
    nodes = layout(trainer.cfg, {"llama": "model.", "gpt2": "transformer."}[style])
    for path, var in nnx.to_flat_state(params):
        leaves, array = list(nodes["/".join(path)].leaves()), var.get_value()
        shards = {str(i) for i in array.sharding.devices_indices_map(array.shape).values()}
        holders = trainer.mesh.size // len(shards)
        stored = sum(int(np.prod([b - a for a, b in leaf.bounds])) for leaf in leaves)
        done = sum(size for name, size in reads if name in {leaf.name for leaf in leaves})
        assert done == stored * holders, (path, done, stored, holders)


def _index_without_shard(d: Path) -> None:
    """An index naming two shards; only the first (which lacks lm_head.weight) is there."""
    first = "model-00001-of-00002.safetensors"
    (d / "model.safetensors").rename(d / first)
    weight_map = {name: first for name in load_file(d / first)}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _config(old: str, new: str):
    def edit(d: Path) -> None:
        (d / "config.json").write_text((d / "config.json").read_text().replace(old, new))

    return edit


@pytest.mark.parametrize("edit,expect", [
    (lambda d: (d / "model.safetensors").unlink(), ["neither model.safetensors"]),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{not json"),
     ["model.safetensors is not a readable safetensors file"]),
    (_index_without_shard, ["model-00002-of-00002.safetensors (holding lm_head.weight)"]),
    (_config("LlamaForCausalLM", "MistralForCausalLM"),
     ["architectures=['MistralForCausalLM']", "LlamaForCausalLM and GPT2LMHeadModel"]),
    (_config('"intermediate_size": 128', '"intermediate_size": 96'),
     ["gate_proj.weight has shape (128, 64) but config.json implies (96, 64)"]),
    (_config('"rope_type": "default"', '"rope_type": "yarn"'),
     ["rope_scaling type='yarn' is not supported"]),
    (_config('"hidden_size": 64', '"hidden_size": "64"'),
     ["hidden_size='64' is not valid; expected a positive integer"]),
], ids=["no-weights", "corrupt-weights", "missing-shard", "unknown-architecture",
        "shape-mismatch", "rope-scaling", "wrong-type"])
def test_bad_folder_is_one_line(tmp_path, capfd, edit, expect):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", folder)
    edit(folder)
    code = hf_script.main(["logits", "--model", str(folder), "--tokens", "1 2 3", "--json"])
    one_line_error(capfd, code, str(folder), *expect)


def _fixture_config(style: str) -> dict:
    return json.loads((FIXTURES / style / "config.json").read_text())


BAD_CONFIGS = [
    ("llama", {"hidden_size": "64"}, "hidden_size='64' is not valid; expected a positive integer"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads=0 is not valid"),
    ("llama", {"num_hidden_layers": -1}, "num_hidden_layers=-1 is not valid"),
    ("llama", {"intermediate_size": [128]}, "intermediate_size=[128] is not valid"),
    ("llama", {"hidden_size": True}, "hidden_size=True is not valid"),
    ("llama", {"rope_scaling": "linear"}, "rope_scaling='linear' is not valid; expected an object"),
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps=nan is not valid; expected a positive"),
    ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings='false' is not valid"),
    ("llama", {"max_position_embeddings": None}, "max_position_embeddings is missing"),
    ("llama", {"hidden_size": 60}, "hidden_size=60 is not divisible by num_attention_heads=16"),
    ("llama", {"hidden_size": 128}, "head_dim=4 but hidden_size=128 / num_attention_heads=16 = 8"),
    ("llama", {"num_key_value_heads": 5}, "num_attention_heads=16 is not a multiple of "
                                          "num_key_value_heads=5"),
    ("llama", {"architectures": "LlamaForCausalLM"},
     "architectures='LlamaForCausalLM' is not valid"),
    ("gpt2", {"vocab_size": -300}, "vocab_size=-300 is not valid; expected a positive integer"),
    ("gpt2", {"n_positions": 64.0}, "n_positions=64.0 is not valid"),
    ("gpt2", {"n_embd": 60}, "n_embd=60 is not divisible by n_head=8"),
]


@pytest.mark.parametrize("style,edit,expect", BAD_CONFIGS,
                         ids=[f"{style}-{next(iter(edit))}" for style, edit, _ in BAD_CONFIGS])
def test_config_json_bad_values_are_named(style, edit, expect):
    """In-process, on a dict: a wrong type, count or width in config.json is one message naming
    the key, the value and what is expected (not a TypeError, nor blamed on another key)."""
    with pytest.raises(ConfigError) as err:
        config_from_hf({**_fixture_config(style), **edit}, Path("m/config.json"))
    assert str(err.value).startswith("m/config.json") and expect in str(err.value), err.value


def _weights(drop=(), change=None):
    """A folder edit: the fixture's tensors, less those in `drop`, `change(name, array)` applied."""
    def edit(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        tensors = {k: change(k, v) if change else v for k, v in tensors.items() if k not in drop}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    return edit


def _poison(name: str, value, dtype=None):
    """Tensor `name` with one element set to `value` (late in the tensor: one device's block),
    or cast to `dtype`."""
    def change(key, array):
        if key != name:
            return array
        if dtype is not None:
            return array.astype(dtype)
        array = array.copy()
        array.reshape(-1)[-3] = value
        return array

    return change


@pytest.mark.parametrize("edit,expect", [
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}'),
     ["weight_map is a list, not an object"]),
    (_config('"hidden_size": 64', '"hidden_size": 96'),
     ["hidden_size=96 but the embedding's weights are 64 wide; set hidden_size to 64"]),
    (_weights(drop=["model.layers.1.mlp.up_proj.weight"]),
     ["tensor model.layers.1.mlp.up_proj.weight is missing"]),
], ids=["weight-map-list", "hidden-size-vs-weights", "missing-tensor"])
def test_bad_folder_fails_at_open(tmp_path, edit, expect):
    """Checked when the folder is opened, before any mesh exists (in-process, cheap)."""
    shutil.copytree(FIXTURES / "llama", tmp_path / "m")
    edit(tmp_path / "m")
    with pytest.raises(ConfigError) as err:
        Folder(tmp_path / "m")
    assert all(e in str(err.value) for e in expect), err.value


@pytest.mark.parametrize("change,expect", [
    (_poison("model.layers.1.mlp.down_proj.weight", np.nan), "tensor model.layers.1.mlp.down_proj"
                                                             ".weight holds NaN or infinite"),
    (_poison("lm_head.weight", -np.inf), "tensor lm_head.weight holds NaN or infinite"),
    (_poison("model.norm.weight", 0, np.int32), "tensor model.norm.weight is I32, not a float"),
    (_poison("model.embed_tokens.weight", 0, np.bool_), "model.embed_tokens.weight is BOOL"),
], ids=["nan", "inf", "int32", "bool"])
def test_bad_weights_are_one_line(tmp_path, capfd, change, expect):
    """NaN/Inf found in the block a device reads (no extra pass); an integer or bool tensor from
    the header, when the folder opens. On a mesh, so the bad value sits in one device's shard."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", folder)
    _weights(change=change)(folder)
    code = hf_script.main(["logits", "--model", str(folder), "--tokens", "1 2 3", "--mesh",
                           "tensor=4", "--json"])
    one_line_error(capfd, code, str(folder), expect)


def test_bad_weights_in_train_touch_no_checkpoint_dir(tmp_path, capfd):
    """train.py --init-from-hf loads the weights before it opens --checkpoint-dir, so NaN
    weights (found only as each device reads its block) neither create the folder nor, with
    --overwrite, delete the checkpoints in it."""
    folder, ckpt = tmp_path / "model", tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "llama", folder)
    _weights(change=_poison("lm_head.weight", np.nan))(folder)
    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(256)) * 4)
    (ckpt / "step_3" / "params").mkdir(parents=True)  # an earlier run's checkpoint
    (ckpt / "step_3" / "params" / "data").write_bytes(b"weights")
    before = sorted(ckpt.rglob("*"))
    code = train_script.main(["--init-from-hf", str(folder), "--data", str(text), "--steps", "1",
                              "--seq-len", "16", "--batch-size", "8", "--mesh", "data=8",
                              "--checkpoint-dir", str(ckpt), "--overwrite"])
    one_line_error(capfd, code, "tensor lm_head.weight holds NaN or infinite")
    assert sorted(ckpt.rglob("*")) == before


def _loaded_line(folder) -> str:
    """What a load from `folder` prints: every tensor of the fixture file is read."""
    tensors = load_file(Path(folder) / "model.safetensors")
    return (f"loaded {len(tensors)} tensors ({sum(t.size for t in tensors.values()):,} "
            f"parameters) from {folder}")


def test_logits_prints_what_it_loaded(capfd):
    gpt2 = str(FIXTURES / "gpt2")
    assert hf_script.main(["logits", "--model", gpt2, "--tokens", "1 2 3"]) == 0
    assert capfd.readouterr().out.splitlines()[0] == _loaded_line(gpt2)


def test_tokenizer_encodes_as_tokenizers_does():
    from tokenizers import Tokenizer

    text = "def f(x):\n    return x\n\n\nprint(f(1))  # é\n"
    want = Tokenizer.from_file(str(FIXTURES / "llama" / "tokenizer.json")).encode(text).ids
    assert load_tokenizer(FIXTURES / "llama")(text.encode()).tolist() == want


def test_logits_cli_json():
    """The real command line, on a mesh: JSON out, float32 logits of the unpadded vocabulary."""
    tokens, want = reference("gpt2")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "hf.py"), "logits", "--model",
         str(FIXTURES / "gpt2"), "--tokens", " ".join(map(str, tokens)), "--mesh", "tensor=2",
         "--cpu-devices", "2", "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    got = np.asarray(json.loads(out.stdout)["logits"], np.float32)
    assert got.shape == want.shape and rel_err(got, want) < RTOL


@pytest.mark.parametrize("style,flags,follow", [
    ("gpt2", ["--seq-len", "128"], r"give (--seq-len \d+) or less"),  # learned positions
    ("llama", ["--seq-len", "256"], r"pass (--max-seq-len \d+)"),  # rotary: no table to outgrow
], ids=STYLES[::-1])
def test_init_from_hf_seq_len_error_can_be_followed(tmp_path, style, flags, follow):
    """train.py --init-from-hf with a --seq-len past the folder's positions (GPT-2: 128 >
    n_positions 64) is refused with a fix, and the run built with that fix is accepted
    (in-process, up to the Trainer; nothing compiles). It used to ask GPT-2 for a --max-seq-len
    that the next run refused as conflicting with config.json. Without --seq-len the run takes
    128 or the folder's positions where fewer (it used to compare None with an int and crash)."""
    import re

    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:20_000])
    base = ["--init-from-hf", str(FIXTURES / style), "--tokenizer", str(FIXTURES / style),
            "--data", str(text), "--steps", "1", "--batch-size", "8", "--mesh", "data=8",
            "--eval-every", "0"]
    run = [*base, *flags]
    with pytest.raises(ConfigError) as err:
        train_script.build(train_script.parse_args(run))
    fix = re.search(follow, str(err.value))
    assert fix and "--seq-len" in str(err.value), err.value
    trainer, _ = train_script.build(train_script.parse_args([*run, *fix[1].split()]))
    assert trainer.cfg.max_seq_len == {"gpt2": 64, "llama": 256}[style]  # Trainer checked it
    args = train_script.parse_args(base)  # no --seq-len
    train_script.build(args)
    assert args.seq_len == {"gpt2": 64, "llama": 128}[style]  # 128, or n_positions if fewer


def test_init_from_hf_seq_len_error_names_the_limit_in_force():
    """A Llama's --max-seq-len raised, but not enough: the error names that flag's limit, not
    the folder's max_position_embeddings."""
    from tppjax.spmd.hf import fine_tune_config

    with pytest.raises(ConfigError, match=r"^--seq-len 512 is longer than the 256 positions the "
                                          r"model has \(--max-seq-len 256\); give --seq-len 256 "
                                          r"or less, or pass --max-seq-len 512"):
        fine_tune_config(str(FIXTURES / "llama"), {"max_seq_len": ("--max-seq-len 256", 256)},
                         seq_len=512)


def test_fine_tune_from_hf_then_export(tmp_path, capfd):
    """train.py --init-from-hf --tokenizer trains two steps (also through zb-h1 in bfloat16,
    from the same loss); scripts/hf.py exports the saved
    params (the latest, and --step 0) as folders that load back to the same arrays; --out is
    never overwritten."""
    llama, ckpt, out = str(FIXTURES / "llama"), tmp_path / "ckpt", tmp_path / "out"
    code = train_script.main(["--init-from-hf", llama, "--heads", "4"])
    one_line_error(capfd, code, "--heads 4 conflicts", "n_heads=16")
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:20_000])
    run = ["--init-from-hf", llama, "--tokenizer", llama, "--data", str(text), "--steps", "2",
           "--batch-size", "4", "--seq-len", "16", "--eval-every", "0", "--lr", "1e-2",
           "--warmup", "1"]
    assert train_script.main([*run, "--mesh", "data=2,tensor=4", "--checkpoint-dir", str(ckpt),
                              "--checkpoint-every", "1", "--metrics",
                              str(tmp_path / "f32.jsonl")]) == 0
    assert _loaded_line(llama) in capfd.readouterr().out
    # The same start through a pipeline schedule in bfloat16: step 1's loss is the loaded
    # model's on the first batch, so it differs from float32's by bf16 rounding only.
    assert train_script.main([*run, "--mesh", "data=2,stage=2,tensor=2", "--schedule", "zb-h1",
                              "--microbatches", "2", "--dtype", "bfloat16", "--metrics",
                              str(tmp_path / "bf16.jsonl")]) == 0
    f32, bf16 = (json.loads((tmp_path / f"{n}.jsonl").read_text().splitlines()[0])["loss"]
                 for n in ("f32", "bf16"))
    assert 0 < abs(f32 - bf16) <= 0.02, (f32, bf16)
    capfd.readouterr()
    assert hf_script.main(["export", "--checkpoint-dir", str(ckpt), "--out", str(out)]) == 0
    from tppjax.spmd.sampling import load

    trained = flat(load(ckpt, "data=1", 1, jax.devices()[:1])[1])
    exported = flat(hf.open_model(out, "data=1", 8)[1])
    original = flat(hf.open_model(llama, "data=1", 8)[1])
    for name, array in trained.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    assert not np.array_equal(trained["blocks/attn/wqkv"], original["blocks/attn/wqkv"])
    assert hf_script.main(["export", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "s0"),
                           "--step", "0"]) == 0
    # The warm-up starts at lr 0, so step 0 left the weights as they were loaded.
    first = flat(hf.open_model(tmp_path / "s0", "data=1", 8)[1])
    for name, array in original.items():
        np.testing.assert_array_equal(first[name], array, err_msg=name)
    before = (out / "model.safetensors").read_bytes()
    capfd.readouterr()
    code = hf_script.main(["export", "--checkpoint-dir", str(ckpt), "--out", str(out)])
    one_line_error(capfd, code, f"--out {out} already exists")
    assert (out / "model.safetensors").read_bytes() == before
