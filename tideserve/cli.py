"""`tideserve` command line: the one composition root that may start any service.

tideserve model prepare      convert the embedded default model into the cache (once)
tideserve model path         print the default model's folder, preparing it if needed
tideserve generate PROMPT    run the offline engine on one prompt and print the text
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from tideserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_model(args: argparse.Namespace) -> int:
    from tideserve.engine.default_model import prepare_default_model

    path = prepare_default_model(progress=True)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tideserve.engine.llm import LLM
    from tideserve.engine.sequence import SamplingParams

    cfg = engine_config(args)
    llm = LLM(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    print(llm.generate(prompt, params)[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tideserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage the embedded default model")
    model.add_argument("action", choices=["prepare", "path"])
    model.set_defaults(func=cmd_model)
    gen = sub.add_parser("generate", help="offline generation for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"tideserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
