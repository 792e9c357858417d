"""`llamaserve bench report DIR...`: a Markdown table and PNG plots from saved `bench serve` results.

Results are grouped into series by (label, dataset, input length, output length); several directories (say,
llamaserve's and vLLM's results) overlay in the same plots. Plots:
- `tradeoff_*.png`: output throughput per GPU (tok/s/GPU) against per-user output speed (tok/s/user), one
  point per concurrency: the throughput/latency trade-off curve of the NVIDIA guides.
- `latency_*.png`: TTFT and TPOT (mean and the highest saved percentile, ms) against concurrency.
The table goes to `report.md` in the output directory and to stdout.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from llamaserve.config import ConfigError

COLUMNS = [("max_concurrency", "conc", "{}"), ("completed", "ok", "{}"), ("failed", "failed", "{}"),
           ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.1f}"),
           ("output_throughput_per_gpu", "out tok/s/GPU", "{:.1f}"),
           ("mean_per_user_output_speed", "tok/s/user", "{:.1f}"), ("mean_ttft_ms", "TTFT mean ms", "{:.1f}"),
           ("mean_tpot_ms", "TPOT mean ms", "{:.2f}"), ("mean_itl_ms", "ITL mean ms", "{:.2f}"),
           ("mean_e2el_ms", "E2EL mean ms", "{:.0f}")]


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p} is neither a directory nor a file")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "output_throughput" in data and "completed" in data:
            data.setdefault("label", data.get("backend", "server"))
            results.append(data)
    if not results:
        raise ConfigError(f"no bench serve results (*.json with output_throughput) in {', '.join(paths)}")
    return results


def series_key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return (str(r.get("label")), str(r.get("dataset_name", "?")), int(r.get("random_input_len") or 0),
            int(r.get("random_output_len") or 0))


def group(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[series_key(r)].append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r.get("max_concurrency") or 0)
    return dict(groups)


def _pct_key(r: dict[str, Any], metric: str) -> str | None:
    keys = [k for k in r if k.startswith("p") and k.endswith(f"_{metric}_ms")]
    return max(keys, key=lambda k: float(k[1:].split("_")[0])) if keys else None


def markdown(groups: dict[tuple, list[dict[str, Any]]]) -> str:
    out = []
    for (label, dataset, isl, osl), rs in groups.items():
        out.append(f"### {label}: {dataset} {isl}/{osl}\n")
        heads = [h for _, h, _ in COLUMNS]
        pk = _pct_key(rs[0], "ttft"), _pct_key(rs[0], "tpot")
        if pk[0]:
            heads.append(pk[0].replace("_ms", " ms").replace("_", " "))
        if pk[1]:
            heads.append(pk[1].replace("_ms", " ms").replace("_", " "))
        out.append("| " + " | ".join(heads) + " |")
        out.append("|" + "---|" * len(heads))
        for r in rs:
            cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in COLUMNS]
            cells += [f"{r[k]:.1f}" for k in pk if k and k in r]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(groups: dict[tuple, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Write every figure of `figures()` as PNG; returns the paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(groups):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def figures(groups: dict[tuple, list[dict[str, Any]]]) -> list[tuple[str, Any]]:
    """(file name, matplotlib Figure) of each plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'llamaserve[bench]'") from None
    by_workload: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for (label, dataset, isl, osl), rs in groups.items():
        by_workload[(dataset, isl, osl)][label] = rs
    figs = []
    for (dataset, isl, osl), per_label in by_workload.items():
        tag = f"{dataset}_{isl}_{osl}"
        fig, ax = plt.subplots(figsize=(7, 5))
        for label, rs in per_label.items():
            xs = [r["mean_per_user_output_speed"] for r in rs]
            ys = [r["output_throughput_per_gpu"] for r in rs]
            ax.plot(xs, ys, marker="o", label=label)
            for r, x, y in zip(rs, xs, ys):
                ax.annotate(f"c{r.get('max_concurrency')}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.set_xlabel("per-user output speed (tokens/s/user)")
        ax.set_ylabel("output throughput per GPU (tokens/s/GPU)")
        ax.set_title(f"Throughput vs. interactivity, {dataset} ISL/OSL {isl}/{osl}")
        ax.grid(True, alpha=0.3)
        ax.legend(title="server")
        figs.append((f"tradeoff_{tag}.png", fig))

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
            for label, rs in per_label.items():
                conc = [r.get("max_concurrency") or 0 for r in rs]
                ax.plot(conc, [r.get(f"mean_{metric}_ms", 0.0) for r in rs], marker="o", label=f"{label} mean")
                pk = _pct_key(rs[0], metric)
                if pk:
                    ax.plot(conc, [r.get(pk, 0.0) for r in rs], marker="x", linestyle="--",
                            label=f"{label} {pk.split('_')[0].upper()}")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrency (requests in flight)")
            ax.set_ylabel(f"{name} (ms)")
            ax.set_title(f"{name} vs. concurrency, {isl}/{osl}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        figs.append((f"latency_{tag}.png", fig))
    return figs


def run(ns: argparse.Namespace) -> int:
    results = load_results(ns.dirs)
    groups = group(results)
    out_dir = Path(ns.output or (ns.dirs[0] if Path(ns.dirs[0]).is_dir() else Path(ns.dirs[0]).parent))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(groups)
    (out_dir / "report.md").write_text(table)
    print(table)
    for path in plot(groups, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / 'report.md'}")
    return 0
