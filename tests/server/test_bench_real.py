"""`llamaserve bench serve` against a real `llamaserve serve` (bundled SmolLM2, CPU), a sweep, and `bench report`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from llamaserve.bench import report
from llamaserve.entrypoints.cli import main


def test_random_and_chat_runs_sweep_and_report(server, tmp_path, capsys):
    out = tmp_path / "results"
    base = ["bench", "serve", "--base-url", server.url, "--disable-tqdm", "--result-dir", str(out)]
    assert main([*base, "--dataset-name", "random", "--random-input-len", "48", "--random-output-len", "6",
                 "--num-prompts", "6", "--max-concurrency", "3", "--ignore-eos", "--save-result",
                 "--result-filename", "random.json"]) == 0
    r = json.loads((out / "random.json").read_text())
    assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 36
    assert r["total_input_tokens"] == 6 * 48  # the server's own count: the prompts re-tokenize exactly
    assert r["output_tokens_from"] == "usage" and r["model"] == "SmolLM2-135M-Instruct"
    assert 0 < r["mean_ttft_ms"] < r["mean_e2el_ms"] and r["mean_tpot_ms"] > 0
    assert main([*base, "--backend", "openai-chat", "--random-input-len", "16", "--random-output-len", "4",
                 "--num-prompts", "3", "--ignore-eos", "--save-result", "--result-filename", "chat.json",
                 "--label", "chat"]) == 0
    assert json.loads((out / "chat.json").read_text())["completed"] == 3
    sweep = tmp_path / "sweep"
    assert main(["bench", "serve", "--base-url", server.url, "--disable-tqdm", "--result-dir", str(sweep),
                 "--random-input-len", "32", "--random-output-len", "4", "--ignore-eos", "--concurrency-sweep", "1,2",
                 "--multi-round", "2", "--label", "llamaserve-cpu"]) == 0
    files = sorted(p.name for p in sweep.glob("*.json"))
    assert files == ["llamaserve-cpu-random-32-4-c1.json", "llamaserve-cpu-random-32-4-c2.json"]
    assert [json.loads((sweep / f).read_text())["completed"] for f in files] == [2, 4]
    text = capsys.readouterr().out
    assert text.count("Serving Benchmark Result") == 4

    # a second "server" (the same results relabelled) overlays in the same plots
    other = tmp_path / "other"
    other.mkdir()
    for f in files:
        d = json.loads((sweep / f).read_text())
        d["label"] = "other-server"
        (other / f).write_text(json.dumps(d))
    rep = tmp_path / "report"
    assert main(["bench", "report", str(sweep), str(other), "-o", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "### llamaserve-cpu: random 32/4" in md and "### other-server: random 32/4" in md
    assert md.count("\n| 1 |") == 2 and md.count("\n| 2 |") == 2
    for name in ("tradeoff_random_32_4.png", "latency_random_32_4.png"):
        img = matplotlib.image.imread(rep / name)
        assert img.shape[0] > 300 and img.shape[1] > 500
    figs = dict(report.figures(report.group(report.load_results([str(sweep), str(other)]))))
    ax = figs["tradeoff_random_32_4.png"].axes[0]
    assert "tokens/s/user" in ax.get_xlabel() and "tokens/s/GPU" in ax.get_ylabel()
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["llamaserve-cpu", "other-server"]
    for ax in figs["latency_random_32_4.png"].axes:
        assert "(ms)" in ax.get_ylabel() and "concurrency" in ax.get_xlabel()
        assert len(ax.get_legend().get_texts()) == 4  # mean and P99 for each server


def test_report_of_an_empty_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert "no bench serve results" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["throughput", "latency"])
def test_offline_benchmarks(cmd, tmp_path):
    out = tmp_path / "r.json"
    extra = ["--num-prompts", "4"] if cmd == "throughput" else ["--batch-size", "2", "--num-iters", "1"]
    assert main(["bench", cmd, "--input-len", "16", "--output-len", "5", "--cpu-kv-cache-gib", "0.25",
                 "--output-json", str(out), *extra]) == 0
    r = json.loads(out.read_text())
    if cmd == "throughput":
        assert r["num_requests"] == 4 and r["total_output_tokens"] == 20 and r["total_input_tokens"] == 64
        assert r["output_tokens_per_second"] == pytest.approx(20 / r["elapsed_time"])
    else:
        assert r["num_decode_steps"] == 4 and r["prefill_ms"]["mean"] > 0 and r["decode_step_ms"]["mean"] > 0
        assert r["avg_latency"] * 1000 >= r["prefill_ms"]["mean"]


def test_random_prompts_retokenize_to_length(llm):
    from llamaserve.bench.datasets import random_requests

    for isl in (100, 1000):
        reqs = random_requests(llm.tokenizer, 8, isl, 4, range_ratio=0.2, prefix_len=10, seed=3)
        for r in reqs:
            n = len(llm.tokenizer.encode(r.prompt, add_special_tokens=False))
            assert abs(n - r.prompt_len) <= 0.01 * r.prompt_len
            assert 0.8 * isl + 10 <= r.prompt_len <= 1.2 * isl + 10 + 1
        assert len({r.prompt[:20] for r in reqs}) == 1  # the shared prefix


def test_unknown_percentile_metric_is_an_error(server, capsys):
    assert main(["bench", "serve", "--base-url", server.url, "--percentile-metrics", "ttft,foo"]) == 2
    assert "foo" in capsys.readouterr().err


def test_sharegpt_file(server, tmp_path):
    data = [{"conversations": [{"from": "human", "value": f"Tell me about the number {i}, in a few words."},
                               {"from": "gpt", "value": "It is a number, and numbers are useful things."}]}
            for i in range(5)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    assert main(["bench", "serve", "--base-url", server.url, "--disable-tqdm", "--dataset-name", "sharegpt",
                 "--dataset-path", str(path), "--num-prompts", "3", "--save-result", "--result-dir", str(tmp_path),
                 "--result-filename", "sg.json"]) == 0
    r = json.loads(Path(tmp_path / "sg.json").read_text())
    assert r["completed"] == 3 and r["dataset_name"] == "sharegpt"


def test_trtllm_quick_start_client_flags(server, tmp_path):
    """The TensorRT-LLM quick start's benchmark_serving flags, token ids sent from the client."""
    assert main(["bench", "serve", "--base-url", server.url, "--model", "SmolLM2-135M-Instruct", "--backend",
                 "openai", "--dataset-name", "random", "--random-input-len", "40", "--random-output-len", "3",
                 "--random-prefix-len", "0", "--random-ids", "--num-prompts", "4", "--max-concurrency", "2",
                 "--ignore-eos", "--tokenize-on-client", "--percentile-metrics", "ttft,tpot,itl,e2el",
                 "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "t.json"]) == 0
    r = json.loads((tmp_path / "t.json").read_text())
    assert r["completed"] == 4 and r["total_input_tokens"] == 160 and r["total_output_tokens"] == 12
