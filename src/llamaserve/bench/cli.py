"""Subcommands of `llamaserve bench`."""

from __future__ import annotations

import argparse


def _serve(ns: argparse.Namespace) -> int:
    from llamaserve.bench.serve import run

    return run(ns)


def _report(ns: argparse.Namespace) -> int:
    from llamaserve.bench.report import run

    return run(ns)


def _throughput(ns: argparse.Namespace) -> int:
    from llamaserve.bench.offline import run_throughput

    return run_throughput(ns)


def _latency(ns: argparse.Namespace) -> int:
    from llamaserve.bench.offline import run_latency

    return run_latency(ns)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from llamaserve.bench import serve as bench_serve
    from llamaserve.entrypoints.options import add_options

    p = sub.add_parser("serve", help="serving benchmark against an OpenAI-compatible server (vLLM's flags)")
    bench_serve.add_args(p)
    p.set_defaults(func=_serve)
    r = sub.add_parser("report", help="Markdown table and PNG plots from saved results")
    r.add_argument("dirs", nargs="+", help="directories (or files) of result JSONs; several servers overlay")
    r.add_argument("--output", "-o", default=None, help="output directory (default: the first DIR)")
    r.set_defaults(func=_report)
    for name, fn, help_ in (("throughput", _throughput, "offline throughput: all prompts at once, in-process"),
                            ("latency", _latency, "fixed batch: prefill time and per-step decode time")):
        q = sub.add_parser(name, help=help_)
        add_options(q, server=False)
        q.add_argument("--input-len", type=int, default=1024)
        q.add_argument("--output-len", type=int, default=128)
        q.add_argument("--output-json", default=None)
        if name == "throughput":
            q.add_argument("--num-prompts", type=int, default=1000)
        else:
            q.add_argument("--batch-size", type=int, default=8)
            q.add_argument("--num-iters", type=int, default=3)
            q.add_argument("--num-iters-warmup", type=int, default=1)
        q.set_defaults(func=fn)
