"""`llamaserve` command line: `serve` (OpenAI-compatible server), `generate` (one prompt, streamed) and `chat`.

Engine options take vLLM or TensorRT-LLM spellings, from flags or YAML files (see entrypoints/options.py). An
unknown option is an error that names it. Sampling is seeded by the engine's `--seed`, so a command repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from llamaserve.config import ConfigError
from llamaserve.entrypoints.options import add_options, resolve
from llamaserve.errors import InvalidRequestError
from llamaserve.sampling_params import SamplingParams


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None)


def sampling_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                          min_p=ns.min_p, stop=ns.stop)


def _make_llm(ns: argparse.Namespace):
    from llamaserve.entrypoints.llm import LLM

    args, _ = resolve(ns)
    return LLM(**dataclasses.asdict(args))


def cmd_serve(ns: argparse.Namespace) -> int:
    from llamaserve.entrypoints.openai.serve import serve

    args, server = resolve(ns)
    return serve(args, server)


def cmd_generate(ns: argparse.Namespace) -> int:
    llm = _make_llm(ns)
    for delta in llm.stream(ns.prompt, sampling_from(ns)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    llm = _make_llm(ns)
    params = sampling_from(ns)
    messages: list[dict[str, str]] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    print("Type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for delta in llm.stream(llm.apply_chat_template(messages), params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt, streamed to stdout")
    gen.add_argument("--prompt", required=True)
    chat = sub.add_parser("chat", help="chat in the terminal with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    for p in (gen, chat):
        add_options(p, server=False)
        add_sampling_args(p)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                           description="Start the OpenAI-compatible server. Flags take vLLM or TensorRT-LLM "
                                       "spellings; see docs/server.md.")
    serve.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                       help="checkpoint dir, .gguf file or dummy preset (default: the bundled SmolLM2)")
    add_options(serve, server=True)
    bench = sub.add_parser("bench", help="benchmarks: serve, report, throughput, latency").add_subparsers(
        dest="bench_command", required=True)
    from llamaserve.bench import cli as bench_cli

    bench_cli.add_parsers(bench)
    quant = sub.add_parser("quantize", help="write a ModelOpt-layout FP8 or NVFP4 checkpoint from a bf16/fp16 one",
                           description="Calibrate on random tokens and write an FP8 (W8A8 per-tensor) or NVFP4 "
                                       "(e2m1 weights, e4m3 scales per 16) checkpoint, with FP8 KV scales, in NVIDIA "
                                       "ModelOpt's layout.")
    quant.add_argument("model", help="source checkpoint directory (safetensors)")
    quant.add_argument("--output", "-o", required=True, help="directory to write")
    quant.add_argument("--qformat", "--format", dest="qformat", choices=["fp8", "nvfp4"], default="fp8",
                       help="fp8 (default) or nvfp4 (ModelOpt's --qformat)")
    quant.add_argument("--calib-tokens", type=int, default=512, help="random calibration tokens (512)")
    quant.add_argument("--no-kv-cache-scales", action="store_true", help="write no k_scale / v_scale")
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)
    serve.set_defaults(func=cmd_serve)
    quant.set_defaults(func=cmd_quantize)
    return parser


def cmd_quantize(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from llamaserve.loader.quantize import quantize_checkpoint

    if not (Path(ns.model) / "config.json").is_file():
        raise ConfigError(f"{ns.model!r} is not a checkpoint directory with a config.json")
    out = quantize_checkpoint(ns.model, ns.output, ns.calib_tokens, not ns.no_kv_cache_scales, ns.qformat)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ConfigError, InvalidRequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
