"""Hugging Face Llama / GPT-2 folders: logits on any mesh, and train.py checkpoints out.

    python scripts/hf.py logits --model DIR --tokens "1 2 3" [--mesh tensor=8] --json
    python scripts/hf.py export --checkpoint-dir D --out DIR [--step N]

`logits` loads DIR (config.json + model.safetensors, or a sharded index) directly sharded on
the mesh and prints the float32 logits of every position over the unpadded vocabulary.
`export` writes a train.py checkpoint (the latest, or step N) as a folder that `transformers`
loads with `from_pretrained`. Bad settings print one line and exit 2.
"""

import argparse
import json
import sys

from tppjax.cli.flags import Parser, check_limits, configure_devices


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    lg = sub.add_parser("logits", help="logits of a token sequence")
    lg.add_argument("--model", required=True, help="a Hugging Face model folder")
    lg.add_argument("--tokens", required=True, help='token ids, e.g. "1 2 3"')
    lg.add_argument("--mesh", default="data=1", help="axis sizes (default: one device)")
    lg.add_argument("--json", action="store_true", help='print {"tokens", "logits"} as JSON')
    ex = sub.add_parser("export", help="a train.py checkpoint as a Hugging Face folder")
    ex.add_argument("--checkpoint-dir", required=True, help="the --checkpoint-dir of the run")
    ex.add_argument("--out", required=True, help="a new (or empty) folder to write")
    ex.add_argument("--step", type=int, default=None, help="the step to export (default latest)")
    for s in (lg, ex):
        s.add_argument("--cpu-devices", type=int, default=None,
                       help="emulate N CPU devices (selects the CPU)")
    args = p.parse_args(argv)
    check_limits(p, args)
    return args


def parse_tokens(text: str) -> list[int]:
    from tppjax.errors import ConfigError

    try:
        tokens = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 0:
        raise ConfigError(f"--tokens {text!r}: give non-negative integer ids, e.g. \"1 2 3\"")
    return tokens


def run_logits(args) -> None:
    import numpy as np

    from tppjax.errors import ConfigError
    from tppjax.models.hf import Folder
    from tppjax.spmd.hf import logits, open_model

    tokens = parse_tokens(args.tokens)
    with Folder(args.model) as folder:  # the checks that need no mesh, before any is made
        cfg, loaded = folder.cfg, folder.summary()
    if max(tokens) >= cfg.vocab_size or len(tokens) > cfg.max_seq_len:
        raise ConfigError(f"--tokens: {len(tokens)} ids up to {max(tokens)}, but {args.model} "
                          f"takes ids below {cfg.vocab_size} and at most {cfg.max_seq_len} "
                          "positions; change --tokens")
    trainer, params = open_model(args.model, args.mesh, len(tokens))
    out = logits(trainer, params, np.asarray(tokens))
    if args.json:
        print(json.dumps({"tokens": tokens, "logits": out.tolist()}))
        return
    print(f"loaded {loaded} from {args.model}")
    for pos, row in enumerate(out):
        print(f"position {pos}: token {tokens[pos]} -> most likely next {int(row.argmax())} "
              f"(logit {row.max():.4f})")


def run_export(args) -> None:
    import jax

    from tppjax.spmd import hf
    from tppjax.spmd.sampling import load

    hf.check_new_folder(args.out, args.checkpoint_dir)  # before reading anything
    trainer, params, info = load(args.checkpoint_dir, "data=1", 1, jax.devices()[:1],
                                 step=args.step)
    hf.export(trainer.cfg, params, args.out, info.get("tokenizer"))
    print(f"step {info['step']} of {args.checkpoint_dir} written to {args.out} "
          f"({trainer.cfg.style}, {trainer.cfg.n_layers} layers)")


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_devices(args.cpu_devices)
    from tppjax.errors import ConfigError

    try:
        {"logits": run_logits, "export": run_export}[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
