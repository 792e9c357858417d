"""`llamaserve` command line: `generate` (one prompt, streamed) and `chat` (interactive, chat template).

Engine options come from EngineArgs fields, accepted in both spellings (`--max-batch-size` and
`--max_batch_size`), plus `--config FILE.yaml` whose keys are EngineArgs fields. An unknown YAML key is an
error that names it. Sampling is seeded by the engine's `--seed`, so a command repeats its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from llamaserve.config import ConfigError, EngineArgs
from llamaserve.errors import InvalidRequestError
from llamaserve.sampling_params import SamplingParams


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    for f in dataclasses.fields(EngineArgs):
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}, key=lambda s: "_" in s)
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        conv: Any = _bool if "bool" in typ else int if typ.startswith("int") else float if "float" in typ else str
        g.add_argument(*names, dest=f.name, type=conv, default=None, metavar=f.name.upper(),
                       help=f"default: {f.default!r}")
    g.add_argument("--config", default=None, help="YAML file of engine options (EngineArgs field names)")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    values: dict[str, Any] = {}
    if ns.config:
        import yaml

        with open(ns.config) as f:
            values.update(yaml.safe_load(f) or {})
        unknown = sorted(set(values) - set(EngineArgs.field_names()))
        if unknown:
            raise ConfigError(f"{ns.config}: unknown option(s) {unknown}; known: {', '.join(EngineArgs.field_names())}")
    values.update({k: v for k in EngineArgs.field_names() if (v := getattr(ns, k, None)) is not None})
    return EngineArgs(**values)


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

    args = engine_args_from(ns)
    return LLM(**dataclasses.asdict(args))


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
        add_engine_args(p)
        add_sampling_args(p)
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ConfigError, InvalidRequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
