"""Generate text from a scripts/train.py checkpoint or a Hugging Face Llama / GPT-2 folder.

The latest checkpoint of the run goes through the tokenizer it was trained with, else bytes; a
Hugging Face folder through its tokenizer.json when it has one.

    python scripts/sample.py --checkpoint-dir ckpt --prompt "def main(" --max-new-tokens 200
    python scripts/sample.py --model DIR --prompt "Once upon a time" --mesh tensor=2

The model and its settings come from the checkpoint or the folder; it loads onto any mesh
without `stage` (default: one device). Greedy with --temperature 0. A KV cache makes each new
token one step; --no-cache recomputes the sequence instead (same tokens, slower). Bad settings
print one line and exit 2.
"""

import argparse
import sys

from tppjax.cli.flags import Parser, check_limits, configure_devices


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint-dir", help="the --checkpoint-dir of a scripts/train.py run")
    source.add_argument("--model", help="a Hugging Face folder (config.json, *.safetensors; "
                                        "its tokenizer.json if any, else --prompt is token ids)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K likeliest; 0: all")
    p.add_argument("--mesh", default=None,
                   help="axis sizes over data, fsdp, tensor (default data=1 on one device)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="emulate N CPU devices (selects the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="recompute the whole sequence for every token (the reference path) "
                        "instead of prefill + one step per token with a KV cache (default: "
                        "the cache)")
    args = p.parse_args(argv)
    check_limits(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_devices(args.cpu_devices)
    import jax

    from tppjax.errors import ConfigError
    from tppjax.spmd.mesh import parse_mesh_spec
    from tppjax.spmd.sampling import check_sampling, generate, load, open_hf, text_codec

    try:
        check_sampling(args.temperature, args.top_k)
        mesh_spec = args.mesh or "data=1"
        size = 1
        for n in parse_mesh_spec(mesh_spec).values():
            size *= n
        devices = jax.devices()[:size]  # the mesh may use fewer devices than there are
        if args.model:
            trainer, params, prompt, detokenize = open_hf(args.model, mesh_spec, args.prompt,
                                                          args.max_new_tokens)
            source = args.model
        else:
            # The prompt's length in tokens is known once the record's tokenizer is read:
            # `generate` checks it against the model's max_seq_len.
            trainer, params, info = load(args.checkpoint_dir, mesh_spec, None, devices)
            to_ids, detokenize = text_codec(info, trainer.cfg.vocab_size)
            prompt = to_ids(args.prompt)
            source = f"checkpoint step {info['step']} of {args.checkpoint_dir}"
        out = generate(trainer, params, prompt, args.max_new_tokens, args.temperature,
                       args.top_k, args.seed, args.cache)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"# {source}", file=sys.stderr)
    for row in out:
        print(detokenize(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
