"""Make the tiny Hugging Face fixtures the tests load, or check a folder against `transformers`.

    pip install -e ".[hf-fixtures]"    # transformers + torch: not needed by the tests
    python scripts/make_hf_fixtures.py                      # writes tests/fixtures/hf/{llama,gpt2}
    python scripts/make_hf_fixtures.py --check DIR --logits OURS.json

The fixtures are random models, written by `transformers` itself, with the reference logits
`transformers` computes for a fixed token sequence: the tests compare this project's loader
with them and need no network and no torch. Weights are drawn wider than the usual 0.02 init
(norm gains and biases too), so that a mapping mistake moves the logits well past 1e-4.
Llama is saved in bfloat16, as published Llama checkpoints are; GPT-2 in float32.

`--check` loads DIR (for example a `scripts/hf.py export` folder) with `from_pretrained` and
compares its logits with OURS.json (`scripts/hf.py logits --json` on the same folder and tokens).
"""

import argparse
import codecs
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    import this

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
VOCAB = 300  # not a multiple of 128: the loader pads it, the exporter trims it
TOKENS = [1, 5, 17, 200, 299, 0, 42, 7]
# tensor=8 must split the kv heads and the MLP: 8 kv heads (Llama: 16 query heads, groups of 2).
LLAMA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 50_000.0,
         "tie_word_embeddings": False}
GPT2 = {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 8, "n_positions": 64,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "bos_token_id": 0,
        "eos_token_id": 0}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random: matrices N(0, 0.1), norm gains 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            is_gain = p.ndim == 1 and ("ln" in name or "norm" in name) and "bias" not in name
            p.copy_(1.0 + noise if is_gain else noise)


def logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the Zen of Python (the same text in every Python): small,
    and any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([codecs.decode(this.s, "rot13")], trainer)
    return tok


def make(name: str, model, dtype: torch.dtype) -> None:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype).eval()
    model.save_pretrained(folder)
    # The reference is what `from_pretrained` of the saved folder computes in float32.
    reloaded = type(model).from_pretrained(folder, dtype=torch.float32).eval()
    ref = {"tokens": TOKENS,  # 8 significant digits: float32 has about 7
           "logits": [[float(f"{x:.8g}") for x in row] for row in logits(reloaded, TOKENS)]}
    (folder / "reference.json").write_text(json.dumps(ref))
    tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder}: {size / 1024:.0f} KiB")


def check(folder: str, ours: str) -> int:
    """Logits of `folder` under `transformers` against ours, as max |diff| / max |reference|."""
    mine = json.loads(Path(ours).read_text())
    tokens = mine.get("tokens") or TOKENS
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = logits(model, tokens)
    diff = np.abs(np.asarray(mine["logits"], np.float32) - theirs).max() / np.abs(theirs).max()
    print(f"{type(model).__name__} from {folder}: logits {theirs.shape}, "
          f"max relative difference {diff:.2e}")
    return 0 if diff < 1e-4 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", metavar="DIR", help="load DIR with transformers and compare")
    p.add_argument("--logits", metavar="OURS.json", help="scripts/hf.py logits --json output")
    args = p.parse_args(argv)
    if args.check:
        return check(args.check, args.logits)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    randomize(llama, 1)
    make("llama", llama, torch.bfloat16)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    randomize(gpt2, 2)
    make("gpt2", gpt2, torch.float32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
