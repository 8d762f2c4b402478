"""Hugging Face Llama and GPT-2 folders ↔ this project's parameter layout. No mesh here.

Each parameter of `models.transformer` is described once as a lazy `Node` over the folder's
tensors: a `Leaf` (an HF tensor, or a block of one, reshaped and transposed into our axes),
`Concat` (pieces side by side along one axis: q|k|v, gate|up, the stacked layers, the vocabulary
and its zero padding) and `Zeros`. `Node.read(index)` reads only the elements of `index` (a
tuple of slices, as `jax.make_array_from_callback` passes) from memory-mapped safetensors;
`Node.write` is its inverse, for export. One description serves both ways, so export then import
is exact by construction.

Layouts (HF `nn.Linear` weights are (out, in); GPT-2's `Conv1D` weights are (in, out)):
  wqkv (D, K, G+2, H)  Llama q_proj (N·H, D) with N = K·G, k_proj/v_proj (K·H, D): query head
                       k·G + g uses kv head k in HF's `repeat_kv` too, so the fused layout is a
                       reshape, no gather. GPT-2 c_attn (D, 3·D) = [q | k | v], K = N, G = 1.
  wo (N, H, D)         o_proj (D, N·H); GPT-2 c_proj (N·H, D).
  w_in (D, 2, F)       gate_proj, up_proj (F, D); GPT-2 c_fc (D, F) as (D, 1, F).
  w_down (F, D)        down_proj (D, F); GPT-2 c_proj (F, D).
RoPE needs no permutation: HF's Llama applies it in the rotate-half form (its conversion script
permutes Meta's interleaved q/k rows into that form), as `models.transformer.rotary` does.
"""

import abc
import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Self

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16": published Llama weights are bf16
import numpy as np
from safetensors import safe_open

from tppjax.errors import ConfigError
from tppjax.models.config import ModelConfig

Index = tuple[slice, ...]
LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors dtypes a weight may be stored in
EMBEDDINGS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight",
              "wte.weight")  # (vocab, width) in either layout, with or without the prefix


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]


class Node(abc.ABC):
    """One of our arrays as a tree over HF tensors: `Leaf`, `Zeros` or `Concat`."""

    shape: tuple[int, ...]

    @abc.abstractmethod
    def read(self, folder: "Folder", index: Index) -> np.ndarray:
        """Our array's elements at `index` (unit-step slices), float32."""

    @abc.abstractmethod
    def write(self, array: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Scatter our full array into the HF tensors of `out` (allocated as `hf_shapes`)."""

    def leaves(self):
        yield from ()


@dataclasses.dataclass(frozen=True)
class Zeros(Node):
    """Vocabulary padding: no HF tensor behind it, dropped on export."""

    shape: tuple[int, ...]

    def read(self, folder, index):
        return np.zeros([hi - lo for lo, hi in _bounds(index, self.shape)], np.float32)

    def write(self, array, out):
        pass


@dataclasses.dataclass(frozen=True)
class Leaf(Node):
    """HF tensor `name` (full shape `hf_shape`), or its block `region` (one (start, stop) per
    dim), reshaped to `view` and transposed so that our axis i is view axis `perm[i]`.

    The view axes split the HF dims in order; a unit axis joins the dim before it as an inner
    axis. A slice of the outermost view axis of a dim is a contiguous range of that dim, so a
    device whose shard cuts only outer axes (what `spmd.rules` shards: heads, kv heads, the MLP
    width, the vocabulary, D) reads exactly its shard; a cut inner axis reads the covering range.
    """

    name: str
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    region: tuple[tuple[int, int], ...] | None = None

    @property
    def shape(self):
        return tuple(self.view[p] for p in self.perm)

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) per HF dim: the block of the HF tensor this leaf covers."""
        return self.region or tuple((0, n) for n in self.hf_shape)

    def _groups(self) -> list[list[int]]:
        """View axes per HF dim."""
        groups, axis = [], 0
        for lo, hi in self.bounds:
            group, size = [], 1
            while size < hi - lo or (axis < len(self.view) and self.view[axis] == 1 and group):
                group.append(axis)
                size *= self.view[axis]
                axis += 1
            groups.append(group)
        return groups

    def read(self, folder, index):
        view_bounds = [None] * len(self.view)
        for ours, (lo, hi) in zip(self.perm, _bounds(index, self.shape), strict=True):
            view_bounds[ours] = (lo, hi)
        hf_index, block, inner = [], [], []
        for (start, _), group in zip(self.bounds, self._groups(), strict=True):
            lo, hi = view_bounds[group[0]]
            step = math.prod(self.view[a] for a in group[1:])
            hf_index.append(slice(start + lo * step, start + hi * step))
            block += [hi - lo, *(self.view[a] for a in group[1:])]
            inner += [slice(None), *(slice(*view_bounds[a]) for a in group[1:])]
        data = folder.read(self.name, tuple(hf_index)).astype(np.float32)
        if not np.isfinite(data).all():  # per block as it is read: no extra pass over the file
            raise ConfigError(f"{folder.path}: tensor {self.name} holds NaN or infinite values; "
                              "replace the weights")
        return data.reshape(block)[tuple(inner)].transpose(self.perm)

    def write(self, array, out):
        block = array.transpose(np.argsort(self.perm)).reshape([hi - lo for lo, hi in self.bounds])
        out[self.name][tuple(slice(lo, hi) for lo, hi in self.bounds)] = block

    def leaves(self):
        yield self


@dataclasses.dataclass(frozen=True)
class Concat(Node):
    """`parts` side by side along `axis`; with `stack`, each part gains that axis (size 1)."""

    axis: int
    parts: tuple[Node, ...]
    stack: bool = False

    def _extent(self, part):
        return 1 if self.stack else part.shape[self.axis]

    @property
    def shape(self):
        first = list(self.parts[0].shape)
        if self.stack:
            first.insert(self.axis, 0)
        first[self.axis] = sum(self._extent(p) for p in self.parts)
        return tuple(first)

    def read(self, folder, index):
        lo, hi = _bounds(index, self.shape)[self.axis]
        pieces, offset = [], 0
        for part in self.parts:
            a, b = max(lo - offset, 0), min(hi - offset, self._extent(part))
            if a < b:
                if self.stack:
                    sub = index[: self.axis] + index[self.axis + 1 :]
                    pieces.append(np.expand_dims(part.read(folder, sub), self.axis))
                else:
                    sub = index[: self.axis] + (slice(a, b),) + index[self.axis + 1 :]
                    pieces.append(part.read(folder, sub))
            offset += self._extent(part)
        return np.concatenate(pieces, self.axis)

    def write(self, array, out):
        offset = 0
        for part in self.parts:
            piece = np.take(array, range(offset, offset + self._extent(part)), self.axis)
            part.write(piece.squeeze(self.axis) if self.stack else piece, out)
            offset += self._extent(part)

    def leaves(self):
        for part in self.parts:
            yield from part.leaves()


def _padded(leaf: Leaf, axis: int, padded: int) -> Node:
    """The vocabulary axis of `leaf` padded with zeros to `padded` (mesh-independent, see
    `ModelConfig.vocab_multiple`)."""
    pad = list(leaf.shape)
    pad[axis] = padded - leaf.shape[axis]
    return Concat(axis, (leaf, Zeros(tuple(pad)))) if pad[axis] else leaf


def layout(cfg: ModelConfig, prefix: str) -> dict[str, Node]:
    """Our parameter path (as `nnx.to_flat_state` spells it, joined by "/") → its `Node`.
    `prefix`: "model." / "transformer." as `*ForCausalLM` saves, or "" for a bare base model."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    v, g = cfg.vocab_size, n // k

    def vec(name):  # a norm gain or a bias
        return Leaf(name, (d,), (d,), (0,))

    if cfg.style == "llama":
        def block(p):
            qkv = [Leaf(p + "self_attn.q_proj.weight", (n * h, d), (k, g, h, d), (3, 0, 1, 2))]
            qkv += [Leaf(p + f"self_attn.{x}_proj.weight", (k * h, d), (k, 1, h, d),
                         (3, 0, 1, 2)) for x in "kv"]
            return {
                "attn_norm/scale": vec(p + "input_layernorm.weight"),
                "attn/wqkv": Concat(2, tuple(qkv)),
                "attn/wo": Leaf(p + "self_attn.o_proj.weight", (d, n * h), (d, n, h), (1, 2, 0)),
                "mlp_norm/scale": vec(p + "post_attention_layernorm.weight"),
                "mlp/w_in": Concat(1, tuple(Leaf(p + f"mlp.{x}_proj.weight", (f, d), (f, d),
                                                 (1, 0)) for x in ("gate", "up")), stack=True),
                "mlp/w_down": Leaf(p + "mlp.down_proj.weight", (d, f), (d, f), (1, 0)),
            }

        layer, embed = prefix + "layers.{}.", prefix + "embed_tokens.weight"
        final = prefix + "norm."
        top = {"head/norm/scale": vec(final + "weight")}
    else:
        def block(p):
            def thirds(name, shape, view):  # q | k | v: columns c·D .. (c+1)·D of c_attn
                rows = tuple((0, s) for s in shape[:-1])
                return Concat(len(view) - 2, tuple(
                    Leaf(name, shape, view, tuple(range(len(view))), (*rows, (c * d, c * d + d)))
                    for c in range(3)))

            return {
                "attn_norm/scale": vec(p + "ln_1.weight"), "attn_norm/bias": vec(p + "ln_1.bias"),
                "attn/wqkv": thirds(p + "attn.c_attn.weight", (d, 3 * d), (d, n, 1, h)),
                "attn/bqkv": thirds(p + "attn.c_attn.bias", (3 * d,), (n, 1, h)),
                "attn/wo": Leaf(p + "attn.c_proj.weight", (n * h, d), (n, h, d), (0, 1, 2)),
                "attn/bo": vec(p + "attn.c_proj.bias"),
                "mlp_norm/scale": vec(p + "ln_2.weight"), "mlp_norm/bias": vec(p + "ln_2.bias"),
                "mlp/w_in": Leaf(p + "mlp.c_fc.weight", (d, f), (d, 1, f), (0, 1, 2)),
                "mlp/b_in": Leaf(p + "mlp.c_fc.bias", (f,), (f, 1), (1, 0)),
                "mlp/w_down": Leaf(p + "mlp.c_proj.weight", (f, d), (f, d), (0, 1)),
                "mlp/b_down": vec(p + "mlp.c_proj.bias"),
            }

        layer, embed, final = prefix + "h.{}.", prefix + "wte.weight", prefix + "ln_f."
        top = {"head/norm/scale": vec(final + "weight"), "head/norm/bias": vec(final + "bias"),
               "positions": Leaf(prefix + "wpe.weight", (cfg.max_seq_len, d),
                                 (cfg.max_seq_len, d), (0, 1))}
    top["embedding"] = _padded(Leaf(embed, (v, d), (v, d), (0, 1)), 0, cfg.padded_vocab)
    if not cfg.tie_embeddings:
        top["head/w"] = _padded(Leaf("lm_head.weight", (v, d), (v, d), (1, 0)), 1,
                                cfg.padded_vocab)
    blocks = [block(layer.format(i)) for i in range(cfg.n_layers)]
    stacked = {"blocks/" + key: Concat(0, tuple(b[key] for b in blocks), stack=True)
               for key in blocks[0]}
    return {**stacked, **top}


def hf_shapes(node: Node) -> dict[str, tuple[int, ...]]:
    """The HF tensors behind `node` and their shapes (GPT-2's c_attn, three leaves, once)."""
    return {leaf.name: leaf.hf_shape for leaf in node.leaves()}


# ---- config.json ----------------------------------------------------------------------------
_EXPECT = {  # what a config.json value must be → its test (bool is not a number here)
    "a positive integer": lambda v: type(v) is int and v > 0,
    "a positive number": lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
    "true or false": lambda v: type(v) is bool,
    "an object (or null)": lambda v: isinstance(v, dict),
}
_INT, _NUM, _BOOL, _OBJ = _EXPECT
# config.json keys this loader reads → (what they must be, required). An optional key may be
# absent or null (transformers writes null for "the default"). Checked before any use, so a
# string, list, zero or negative value is one line naming the key, not a TypeError later.
_KEYS = {
    LLAMA: {"vocab_size": (_INT, True), "hidden_size": (_INT, True),
            "intermediate_size": (_INT, True), "num_hidden_layers": (_INT, True),
            "num_attention_heads": (_INT, True), "max_position_embeddings": (_INT, True),
            "num_key_value_heads": (_INT, False), "head_dim": (_INT, False),
            "rms_norm_eps": (_NUM, False), "rope_theta": (_NUM, False),
            "tie_word_embeddings": (_BOOL, False), "rope_scaling": (_OBJ, False),
            "rope_parameters": (_OBJ, False)},
    GPT2: {"vocab_size": (_INT, True), "n_embd": (_INT, True), "n_layer": (_INT, True),
           "n_head": (_INT, True), "n_positions": (_INT, True), "n_inner": (_INT, False),
           "layer_norm_epsilon": (_NUM, False), "tie_word_embeddings": (_BOOL, False)},
}
# The HF names of the widths our checks speak of, so that an error names the key to fix.
_NAMES = {LLAMA: ("hidden_size", "num_attention_heads", "num_key_value_heads"),
          GPT2: ("n_embd", "n_head", "n_head")}


def _refuse(path: Path, key: str, value, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {key}={value!r} is not supported; {fix}")


def _check_value(path: Path, key: str, value, expect: str) -> None:
    if not _EXPECT[expect](value):
        raise ConfigError(f"{path}: {key}={value!r} is not valid; expected {expect}")


def _get(hf: dict, key: str, default):
    """`hf[key]`, or `default` where it is absent or null."""
    return default if hf.get(key) is None else hf[key]


def _check_keys(hf: dict, path: Path, arch: str, embed_width: int | None) -> None:
    """Types first (the table above), then what the layout needs of the widths, named by the
    HF key: a hidden size that disagrees with the embedding's width or is not divisible by the
    heads is the hidden size's fault, not a head_dim mismatch found later."""
    for key, (expect, required) in _KEYS[arch].items():
        if hf.get(key) is not None:
            _check_value(path, key, hf[key], expect)
        elif required:
            raise ConfigError(f"{path}: {key} is missing; expected {expect} (is it a complete "
                              "config.json?)")
    width, heads, kv = _NAMES[arch]
    d, n = hf[width], hf[heads]
    k = hf.get(kv) or n
    if embed_width is not None and embed_width != d:
        raise ConfigError(f"{path}: {width}={d} but the embedding's weights are {embed_width} "
                          f"wide; set {width} to {embed_width}")
    if d % n:
        raise ConfigError(f"{path}: {width}={d} is not divisible by {heads}={n}; fix {width} "
                          f"or {heads}")
    if n % k:
        raise ConfigError(f"{path}: {heads}={n} is not a multiple of {kv}={k}; fix {kv}")
    if arch == LLAMA and hf.get("head_dim") not in (None, d // n):
        raise ConfigError(f"{path}: head_dim={hf['head_dim']} but {width}={d} / {heads}={n} = "
                          f"{d // n}; this loader needs them equal: fix {width} if it is wrong (a "
                          "model whose head_dim differs is not supported)")
    if arch == LLAMA and (d // n) % 2:
        raise ConfigError(f"{path}: {width}={d} / {heads}={n} gives an odd head size {d // n}; "
                          "rotary positions need an even one")


def config_from_hf(hf: dict, path: Path, embed_width: int | None = None,
                   **overrides) -> ModelConfig:
    """A `ModelConfig` from a config.json dict, refusing what this model does not compute and
    values of the wrong type. `embed_width`: the stored embedding's width, if known."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object; give a "
                          "model's config.json")
    by_type = {"llama": LLAMA, "gpt2": GPT2}  # a config without architectures names its type
    archs = hf.get("architectures") or [by_type.get(hf.get("model_type"))]
    if not isinstance(archs, list):
        raise ConfigError(f"{path}: architectures={archs!r} is not valid; expected a list such "
                          f"as [\"{LLAMA}\"]")
    arch = archs[0]
    if arch not in (LLAMA, GPT2):  # == only: an unhashable entry is refused here too
        raise ConfigError(f"{path}: architectures={hf.get('architectures')!r} is not supported; "
                          f"this loader reads {LLAMA} and {GPT2}")
    _check_keys(hf, path, arch, embed_width)
    if arch == LLAMA:
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise _refuse(path, "rope_scaling type", kind,
                          "only plain RoPE (rope_type 'default') is implemented")
        theta = hf.get("rope_theta") or rope.get("rope_theta", 10_000.0)
        _check_value(path, "rope_theta", theta, _NUM)
        checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"),
                  "attention_bias": (hf.get("attention_bias", False), False),
                  "mlp_bias": (hf.get("mlp_bias", False), False)}
        heads = hf["num_attention_heads"]
        cfg = ModelConfig(style="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                          n_layers=hf["num_hidden_layers"], n_heads=heads,
                          n_kv_heads=hf.get("num_key_value_heads") or heads,
                          d_ff=hf["intermediate_size"],
                          max_seq_len=hf["max_position_embeddings"],
                          norm_eps=hf.get("rms_norm_eps") or 1e-6, rope_theta=theta,
                          tie_embeddings=_get(hf, "tie_word_embeddings", False))
    else:
        d = hf["n_embd"]
        checks = {"activation_function": (hf.get("activation_function", "gelu_new"), "gelu_new"),
                  "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
                  "scale_attn_by_inverse_layer_idx":
                      (hf.get("scale_attn_by_inverse_layer_idx", False), False)}
        cfg = ModelConfig(style="gpt2", vocab_size=hf["vocab_size"], d_model=d,
                          n_layers=hf["n_layer"], n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                          d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
                          norm_eps=hf.get("layer_norm_epsilon") or 1e-5,
                          tie_embeddings=_get(hf, "tie_word_embeddings", True))
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise _refuse(path, key, value, f"{arch} is read with {key}={wanted!r} only")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json for `cfg`: float32 weights, unpadded vocabulary. RoPE's base is written both
    as transformers 4 (`rope_theta`) and 5 (`rope_parameters`) spell it."""
    if cfg.style == "llama":
        return {"architectures": [LLAMA], "model_type": "llama", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}
    return {"architectures": [GPT2], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}


# ---- the folder -----------------------------------------------------------------------------
class Folder:
    """An HF model folder, read lazily: config.json, and the safetensors file(s) memory-mapped.

    `read(name, index)` returns only the elements of `index` (safetensors' `get_slice`), so
    no tensor is ever copied whole unless the caller asks for all of it. Use as a context
    manager: the files stay open (mapped) until it exits.
    """

    def __init__(self, path: str | Path, **overrides):
        self.path = Path(path)
        config = self.path / "config.json"
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: no such folder; give a Hugging Face model folder")
        if not config.is_file():
            raise ConfigError(f"{self.path}: no config.json; give a Hugging Face model folder "
                              "(config.json + model.safetensors)")
        try:
            hf = json.loads(config.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{config} is not readable JSON ({err}); fix or replace it") from err
        self.files: dict[str, str] = {}  # tensor name → file
        self._open: dict[str, object] = {}  # file → its safe_open handle (memory-mapped)
        if (self.path / INDEX).is_file():
            self.files = self._index(self.path / INDEX)
        elif (self.path / SINGLE).is_file():
            self.files = dict.fromkeys(self._handle(str(self.path / SINGLE)).keys(),
                                       str(self.path / SINGLE))
        else:
            raise ConfigError(f"{self.path}: neither {SINGLE} nor {INDEX}; this loader reads "
                              "safetensors only (save the model with safe_serialization)")
        embed = [n for n in EMBEDDINGS if n in self.files]
        width = self._slice(embed[0]).get_shape()[-1] if embed else None
        self.cfg = config_from_hf(hf, config, width, **overrides)
        style = {"llama": ("model.", "embed_tokens.weight"), "gpt2": ("transformer.", "wte.weight")}
        prefix, probe = style[self.cfg.style]
        self.prefix = prefix if prefix + probe in self.files else ""
        self.stored = self.check(layout(self.cfg, self.prefix))

    def _index(self, index: Path) -> dict[str, str]:
        """The weight_map of a sharded folder's index: tensor name → file."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{index} has no readable weight_map ({err!r}); fix or replace "
                              "it") from err
        if not (isinstance(weight_map, dict)
                and all(isinstance(f, str) for f in weight_map.values())):
            raise ConfigError(f"{index}: weight_map is a {type(weight_map).__name__}, not an "
                              "object of tensor name → file name; fix or replace it")
        return {name: str(self.path / file) for name, file in weight_map.items()}

    def summary(self) -> str:
        """"N tensors (P parameters)": what the layout reads from the folder."""
        count = sum(math.prod(shape) for shape in self.stored.values())
        return f"{len(self.stored)} tensors ({count:,} parameters)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def _slice(self, name: str):
        if name not in self.files:
            raise ConfigError(f"{self.path}: tensor {name} is missing; is the folder complete "
                              "(every shard of the index present)?")
        if not Path(self.files[name]).is_file():
            raise ConfigError(f"{self.path}: {Path(self.files[name]).name} (holding {name}) is "
                              "missing")
        return self._handle(self.files[name]).get_slice(name)

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="numpy").__enter__()
            except Exception as err:  # safetensors' own error type is not exported
                raise ConfigError(f"{file} is not a readable safetensors file ({err}); "
                                  "replace it") from err
        return self._open[file]

    def check(self, nodes: dict[str, Node]) -> dict[str, tuple[int, ...]]:
        """Every tensor the layout needs is present, of a float type, with the shape config.json
        implies: read from the headers only, before anything is placed or written. Returns the
        tensors and their shapes."""
        shapes = {}
        for node in nodes.values():
            for leaf in node.leaves():
                tensor = self._slice(leaf.name)
                shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                if shape != leaf.hf_shape:
                    raise ConfigError(
                        f"{self.path}: tensor {leaf.name} has shape {shape} but config.json "
                        f"implies {leaf.hf_shape}; the config and the weights disagree")
                if dtype not in FLOATS:
                    raise ConfigError(f"{self.path}: tensor {leaf.name} is {dtype}, not a float "
                                      f"type ({', '.join(FLOATS)}); replace the weights")
                shapes[leaf.name] = shape
        return shapes

    def read(self, name: str, index: Index) -> np.ndarray:
        return self._slice(name)[index]


def tokenizer_file(path: str | Path) -> Path:
    """The `tokenizer.json` of folder `path`, or `path` itself if it is a file."""
    return Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)


def load_tokenizer(path: str | Path) -> Callable[[bytes], np.ndarray]:
    """The `tokenizer.json` of folder `path` (or that file itself), through the `tokenizers`
    package, as UTF-8 text → int32 token ids (ids may pass uint16: Llama 3 has 128,256)."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if not file.is_file():
        raise ConfigError(f"--tokenizer {path}: no tokenizer.json there; give a Hugging Face "
                          "model folder that has one")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception
        raise ConfigError(f"--tokenizer {file} is not a tokenizers file ({err})") from err

    def encode(text: bytes) -> np.ndarray:
        """Paragraph by paragraph, as one batch: a single call on megabytes is slow (24 s for
        the 8 MB default corpus, 4 s this way) and a merge across a blank line is rare. No
        special tokens (a BOS per paragraph would be noise in the stream)."""
        parts = text.decode("utf-8", errors="replace").split("\n\n")
        parts = [p + "\n\n" for p in parts[:-1]] + parts[-1:]
        ids = tokenizer.encode_batch(parts, add_special_tokens=False)
        return np.fromiter(itertools.chain.from_iterable(e.ids for e in ids), np.int32)

    return encode


def save(path: str | Path, cfg: ModelConfig, fetch: Callable[[str], np.ndarray]) -> None:
    """Write params as an HF folder: config.json and one float32 model.safetensors in the names
    and layouts `transformers` saves (a tied head is not stored). `fetch(our path)` gives one
    full parameter on the host. The file is streamed one parameter at a time (the safetensors
    header needs only the shapes), so the host never holds more than one parameter and its HF
    tensors: `safetensors.numpy.save_file` would hold every tensor twice (arrays and bytes)."""
    path = Path(path)
    nodes = layout(cfg, "model." if cfg.style == "llama" else "transformer.")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for node in nodes.values():
        for name, shape in hf_shapes(node).items():
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path.mkdir(parents=True, exist_ok=True)
    with open(path / SINGLE, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, node in nodes.items():
            out = {name: np.zeros(shape, "<f4") for name, shape in hf_shapes(node).items()}
            node.write(np.asarray(fetch(key), np.float32), out)
            f.writelines(array.data for array in out.values())  # in the header's order
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
