"""``dupstudio generate [MODEL] --prompt TEXT``: stream a continuation to the terminal, then print
prompt and generation speed (tokens/s) to stderr. Greedy by default."""
from __future__ import annotations

import argparse
import sys

from dupstudio.commands.info import HELP_MODEL, StderrProgress


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt (streamed)",
                              description="Stream a continuation of --prompt; tokens/s go to stderr.")
    p.add_argument("model", nargs="?", default=None, help=HELP_MODEL)
    p.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: when it has one)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for --temp > 0")
    p.add_argument("--config", default=None,
                   help="generate with this replication configuration (deploy mode: packed kernels)")
    p.add_argument("--mode", default="deploy", choices=["deploy", "simulate"],
                   help="with --config: deploy (packed quantized kernels) or simulate (dequantized)")
    p.set_defaults(func=run)


def load_for_generation(args):
    """Open the model the command runs; with --config, the configured (replicated) model."""
    from dupstudio.core.model_io import open_model

    if getattr(args, "config", None):
        from dupstudio.commands._common import load_config_and_model
        from dupstudio.core.replicate import build

        cfg, loaded = load_config_and_model(args.config, args.model)
        return build(loaded, cfg, args.mode), loaded.tokenizer

    progress = StderrProgress()
    try:
        loaded = open_model(args.model, progress=progress)
    finally:
        progress.close()
    return loaded.model, loaded.tokenizer


def run(args) -> int:
    from dupstudio.commands._common import check_ranges
    from dupstudio.core.generate import generate_stream

    check_ranges(args, max_tokens=(1, None, "the number of tokens to generate"),
                 temp=(0.0, None, "the sampling temperature (0 = greedy)"),
                 top_p=(0.0, 1.0, "the nucleus sampling threshold (0 = off)"))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_for_generation(args)
    last = None
    for chunk in generate_stream(model, tokenizer, prompt, args.max_tokens, chat=args.chat,
                                 temp=args.temp, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s", file=sys.stderr)
        print(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s"
              f" ({last.finish_reason})", file=sys.stderr)
    return 0
