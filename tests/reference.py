"""An independent reference Transformer in plain `jax.numpy`, written apart from `models/`.

The parity tests of every parallel layout compare against `models/transformer.py` on one device,
so a bug in the model would sit on both sides of them. This file shares no code and no fused
layout with the model: `plain_params` converts the model's parameters once into the published
per-layer layout, and `forward` follows the published conventions over that layout.

Llama (Touvron et al. 2023; Hugging Face `LlamaForCausalLM`): RMSNorm with the config's eps;
rotary position embedding (Su et al. 2021) in the rotate-half form, `x*cos + rotate_half(x)*sin`
with inv_freq = theta^(-2i/H); grouped-query attention (Ainslie et al. 2023) by repeating each
key/value head for n_heads/n_kv_heads consecutive query heads; SwiGLU MLP (Shazeer 2020),
down(silu(gate(x)) * up(x)); no biases; pre-norm residual blocks; final RMSNorm; LM head.

GPT-2 (Radford et al. 2019; Hugging Face `GPT2LMHeadModel`): learned position embeddings added to
the token embeddings; LayerNorm with eps 1e-5 and a bias; GELU in its tanh approximation; biases
on q/k/v, the attention output, and both MLP projections; multi-head attention; final LayerNorm.

Both: causal softmax attention scaled by 1/sqrt(H); logits over the real vocabulary only (no
padding); loss = mean next-token cross-entropy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # only the config's fields are read; nothing from `models` runs here
    from tppjax.models import ModelConfig

GPT2_LAYERNORM_EPS = 1e-5  # GPT-2's `layer_norm_epsilon`


def plain_params(cfg: ModelConfig, p: dict) -> dict:
    """The model's pure-dict parameters (`nnx.state(model).to_pure_dict()`) in the published layout.

    Only slicing and reshaping, so it is a linear map of `p`: differentiating a loss of
    `plain_params(cfg, p)` with respect to `p` applies its exact adjoint, which is how the
    reference's gradients land in the model's layout. Pad rows/columns of the vocabulary are
    dropped here.

    The model fuses q/k/v as wqkv (D, K, G + 2, H): per kv group k, its G query heads, then its key
    head, then its value head. Flattening (K, G) gives query head j = k*G + g, whose key/value head
    is k = j // G: exactly the head that `jnp.repeat(kv, G, axis=heads)` puts at position j.
    """
    n, kv, h, v = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    g = n // kv
    b = p["blocks"]
    gpt2 = cfg.style == "gpt2"
    layers = []
    for i in range(cfg.n_layers):
        wqkv, w_in = b["attn"]["wqkv"][i], b["mlp"]["w_in"][i]  # (D, K, G+2, H), (D, 1|2, F)
        d = wqkv.shape[0]
        layer = {
            "ln1": b["attn_norm"]["scale"][i],
            "ln2": b["mlp_norm"]["scale"][i],
            "wq": wqkv[:, :, :g].reshape(d, n * h),  # columns ordered (head j = k*G + g, H)
            "wk": wqkv[:, :, g].reshape(d, kv * h),
            "wv": wqkv[:, :, g + 1].reshape(d, kv * h),
            "wo": b["attn"]["wo"][i].reshape(n * h, d),
            "w_down": b["mlp"]["w_down"][i],  # (F, D)
        }
        if gpt2:
            bqkv = b["attn"]["bqkv"][i]  # (K, G+2, H)
            layer |= {
                "ln1_b": b["attn_norm"]["bias"][i], "ln2_b": b["mlp_norm"]["bias"][i],
                "bq": bqkv[:, :g].reshape(n * h), "bk": bqkv[:, g].reshape(kv * h),
                "bv": bqkv[:, g + 1].reshape(kv * h), "bo": b["attn"]["bo"][i],
                "w_fc": w_in[:, 0], "b_fc": b["mlp"]["b_in"][i][0], "b_down": b["mlp"]["b_down"][i],
            }
        else:
            layer |= {"w_gate": w_in[:, 0], "w_up": w_in[:, 1]}
        layers.append(layer)
    out = {"wte": p["embedding"][:v], "layers": layers, "ln_f": p["head"]["norm"]["scale"]}
    if gpt2:
        out |= {"wpe": p["positions"], "ln_f_b": p["head"]["norm"]["bias"]}
    # Untied head (D, V); tied: the embedding's transpose, taken in `forward`.
    out["lm_head"] = None if cfg.tie_embeddings else p["head"]["w"][:, :v]
    return out


def rms_norm(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def layer_norm(x, scale, bias, eps=GPT2_LAYERNORM_EPS):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rope(x, theta: float, interleaved: bool = False):
    """(B, T, heads, H). Rotate-half (Hugging Face Llama); `interleaved` pairs (2i, 2i+1) instead,
    the original paper's form, exists only so a test can show the comparison notices the swap."""
    t, h = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # (H/2,)
    freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq  # (T, H/2)
    if interleaved:
        cos, sin = jnp.cos(freqs)[:, None], jnp.sin(freqs)[:, None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(x.shape)
    emb = jnp.concatenate([freqs, freqs], -1)[:, None]  # (T, 1, H)
    rotate_half = jnp.concatenate([-x[..., h // 2:], x[..., : h // 2]], -1)
    return x * jnp.cos(emb) + rotate_half * jnp.sin(emb)


def attention(cfg: ModelConfig, lp: dict, x, *, interleaved_rope=False, tile_kv=False):
    (bsz, t, _), n, kv, h = x.shape, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    gpt2 = cfg.style == "gpt2"
    q, k, v = x @ lp["wq"], x @ lp["wk"], x @ lp["wv"]
    if gpt2:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k, v = q.reshape(bsz, t, n, h), k.reshape(bsz, t, kv, h), v.reshape(bsz, t, kv, h)
    if not gpt2:
        q, k = rope(q, cfg.rope_theta, interleaved_rope), rope(k, cfg.rope_theta, interleaved_rope)
    # GQA: query head j reads kv head j // G (repeat). `tile_kv` (j % K) is the deliberate bug.
    expand = (lambda a: jnp.tile(a, (1, 1, n // kv, 1))) if tile_kv else (
        lambda a: jnp.repeat(a, n // kv, axis=2))
    k, v = expand(k), expand(v)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(h)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    pr = jnp.exp(s - s.max(-1, keepdims=True))
    pr = pr / pr.sum(-1, keepdims=True)
    o = jnp.einsum("bnqk,bknh->bqnh", pr, v).reshape(bsz, t, n * h)
    return o @ lp["wo"] + (lp["bo"] if gpt2 else 0.0)


def forward(cfg: ModelConfig, pp: dict, tokens: jax.Array, **bugs) -> jax.Array:
    """(B, T) tokens → (B, T, vocab_size) float32 logits, from `plain_params` `pp`."""
    gpt2, eps = cfg.style == "gpt2", cfg.norm_eps
    x = pp["wte"][tokens]
    if gpt2:
        x = x + pp["wpe"][: tokens.shape[1]]
    for lp in pp["layers"]:  # pre-norm residual blocks
        if gpt2:
            x = x + attention(cfg, lp, layer_norm(x, lp["ln1"], lp["ln1_b"]), **bugs)
            hid = layer_norm(x, lp["ln2"], lp["ln2_b"])
            x = x + gelu_tanh(hid @ lp["w_fc"] + lp["b_fc"]) @ lp["w_down"] + lp["b_down"]
        else:
            x = x + attention(cfg, lp, rms_norm(x, lp["ln1"], eps), **bugs)
            hid = rms_norm(x, lp["ln2"], eps)
            gate = hid @ lp["w_gate"]
            x = x + (gate / (1.0 + jnp.exp(-gate)) * (hid @ lp["w_up"])) @ lp["w_down"]
    x = layer_norm(x, pp["ln_f"], pp["ln_f_b"]) if gpt2 else rms_norm(x, pp["ln_f"], eps)
    return x @ (pp["wte"].T if pp["lm_head"] is None else pp["lm_head"])


def loss(cfg: ModelConfig, p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of the reference, as a function of the model's pure dict."""
    z = forward(cfg, plain_params(cfg, p), tokens)
    m = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    log_probs = z - (jnp.log(jnp.exp(z - m).sum(-1, keepdims=True)) + m)
    return -jnp.take_along_axis(log_probs, targets[..., None], -1).mean()
