"""The serving benchmark's metric math, against hand-made records and a server that streams at scripted times."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from llamaserve.bench.metrics import RequestRecord, compute_metrics
from llamaserve.entrypoints.cli import main
from tests.bench.scripted_server import ScriptedServer


def _rec(start: float, chunks: list[float], n: int, prompt_len: int = 10) -> RequestRecord:
    return RequestRecord(prompt_len, n, start=start, chunk_times=chunks, output_tokens=n, usage_tokens=True,
                         success=True)


def test_metrics_by_hand():
    a = _rec(0.0, [0.1, 0.2, 0.3, 0.4], 4)  # ttft 100, gaps 100 x3, e2el 400, tpot 100
    b = _rec(0.5, [1.0, 1.2], 2)  # ttft 500, gap 200, e2el 700, tpot 200
    c = RequestRecord(10, 4, start=0.2, error="HTTP 500: boom")
    m = compute_metrics([a, b, c], duration_s=2.0, percentiles=[50, 99], selected=["ttft", "tpot", "itl", "e2el"],
                        goodput_slos_ms={"ttft": 200}, num_gpus=2)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 13.0
    assert m["output_throughput_per_gpu"] == 1.5
    assert m["mean_ttft_ms"] == pytest.approx(300) and m["median_ttft_ms"] == pytest.approx(300)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 400)
    assert m["mean_tpot_ms"] == pytest.approx(150) and m["std_tpot_ms"] == pytest.approx(50)
    assert m["mean_itl_ms"] == pytest.approx((100 * 3 + 200) / 4)  # pooled over gaps: token-weighted
    assert m["median_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(550)
    assert m["mean_per_user_output_speed"] == pytest.approx((10 + 5) / 2)
    assert m["request_goodput"] == 0.5  # only a meets ttft <= 200 ms
    assert m["errors"] == ["", "", "HTTP 500: boom"]


@pytest.fixture()
def scripted():
    srv = ScriptedServer()
    yield srv
    srv.close()


def _dataset(tmp_path: Path, prompts: list[str]) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_tokens": 10}) + "\n" for p in prompts))
    return str(path)


def _bench(url: str, data: str, n: int, tmp_path: Path, *extra: str) -> dict:
    rc = main(["bench", "serve", "--base-url", url, "--tokenizer", "smollm2-135m", "--dataset-name", "custom",
               "--dataset-path", data, "--num-prompts", str(n), "--save-result", "--save-detailed",
               "--result-dir", str(tmp_path), "--result-filename", "r.json", "--disable-tqdm",
               "--metric-percentiles", "50,90,99", *extra])
    assert rc == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_reported_numbers_equal_hand_computed(scripted, tmp_path, capsys):
    prompts = [f"ttft={0.1 if i % 2 == 0 else 0.4} itl=0.05 n={4 + i}" for i in range(6)]
    r = _bench(scripted.url, _dataset(tmp_path, prompts), 6, tmp_path, "--max-concurrency", "6",
               "--goodput", "ttft:250")
    assert r["completed"] == 6 and r["failed"] == 0 and r["model"] == "scripted"
    assert r["output_lens"] == [4, 5, 6, 7, 8, 9]  # the server's usage, not max_tokens (10)
    assert r["output_tokens_from"] == "usage" and r["input_lens"] == [7] * 6
    ttfts, e2els, itls = np.array(r["ttfts"]), np.array(r["e2els"]), r["itls"]
    # the scripted times, measured by the client (loose: scheduling jitter)
    assert np.allclose(ttfts, [0.1, 0.4] * 3, atol=0.08)
    assert all(np.allclose(g, 0.05, atol=0.04) for g in itls)
    # every reported statistic equals the one computed by hand from the per-request data
    tpots = (e2els - ttfts) / (np.array(r["output_lens"]) - 1)
    pooled = np.concatenate([np.array(g) for g in itls])
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", pooled), ("e2el", e2els)):
        ms = values * 1000
        assert r[f"mean_{name}_ms"] == pytest.approx(ms.mean())
        assert r[f"median_{name}_ms"] == pytest.approx(np.median(ms))
        assert r[f"std_{name}_ms"] == pytest.approx(ms.std())
        for p in (50, 90, 99):
            assert r[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(ms, p))
    assert len(pooled) == sum(n - 1 for n in r["output_lens"])
    assert r["total_output_tokens"] == 39
    assert r["output_throughput"] == pytest.approx(39 / r["duration"])
    assert r["request_goodput"] == pytest.approx(3 / r["duration"])  # the three with a 0.1 s TTFT
    assert r["mean_per_user_output_speed"] == pytest.approx(np.mean(1 / tpots))
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out and "P90 ITL (ms):" in out


def test_chat_backend_and_retokenized_counts(tmp_path):
    srv = ScriptedServer(usage=False)
    try:
        r = _bench(srv.url, _dataset(tmp_path, ["ttft=0.01 itl=0.01 n=5"] * 3), 3, tmp_path, "--backend",
                   "openai-chat")
    finally:
        srv.close()
    assert r["completed"] == 3 and r["output_tokens_from"] == "retokenized"
    assert r["output_lens"] == [5, 5, 5]  # " t1 t2 t3 t4 t5" is 5 tokens for the synthetic tokenizer


def test_failures_are_counted_with_reasons(scripted, tmp_path):
    prompts = ["ttft=0.01 itl=0.01 n=3", "fail500", "drop", "slow", "ttft=0.01 itl=0.01 n=3"]
    r = _bench(scripted.url, _dataset(tmp_path, prompts), 5, tmp_path, "--request-timeout", "1")
    assert r["completed"] == 2 and r["failed"] == 3
    errors = r["errors"]
    assert errors[0] == "" and errors[4] == ""
    assert errors[1].startswith("HTTP 500") and "scripted failure" in errors[1]
    assert errors[2] and errors[3]  # dropped connection, timeout
    assert "Timeout" in errors[3]


def test_server_down_still_ends_with_a_result(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _bench(f"http://127.0.0.1:{port}", _dataset(tmp_path, ["ttft=0 itl=0 n=1"] * 2), 2, tmp_path,
               "--model", "x")
    assert r["completed"] == 0 and r["failed"] == 2
    assert all("Connect" in e for e in r["errors"])
    assert "Failed requests:                        2" in capsys.readouterr().out


def test_request_rate_and_burstiness_intervals():
    from llamaserve.bench.serve import _intervals

    rng = np.random.default_rng(0)
    poisson = np.array(_intervals(4000, 20.0, 1.0, rng))
    bursty = np.array(_intervals(4000, 20.0, 0.25, rng))
    assert poisson.mean() == pytest.approx(1 / 20, rel=0.05) and bursty.mean() == pytest.approx(1 / 20, rel=0.1)
    assert poisson.std() == pytest.approx(1 / 20, rel=0.1)  # exponential: std = mean
    assert bursty.std() > 1.5 * poisson.std()
    assert _intervals(3, float("inf"), 1.0, rng) == [0.0, 0.0, 0.0]


def test_request_rate_spreads_the_requests(scripted, tmp_path):
    data = _dataset(tmp_path, ["ttft=0 itl=0 n=1"] * 8)
    r = _bench(scripted.url, data, 8, tmp_path, "--request-rate", "10", "--seed", "1")
    from llamaserve.bench.serve import _intervals

    expected = sum(_intervals(8, 10.0, 1.0, np.random.default_rng(1))[:7])
    assert r["completed"] == 8 and r["duration"] >= expected


@pytest.mark.parametrize("case,lens", [("chat", (128, 128)), ("reasoning", (1000, 1000)),
                                       ("summarization", (8000, 512)), ("generation", (512, 8000)),
                                       ("quickstart", (1024, 1024))])
def test_use_case_sets_lengths(case, lens):
    from llamaserve.bench.serve import apply_use_case
    from llamaserve.entrypoints.cli import build_parser

    ns = build_parser().parse_args(["bench", "serve", "--use-case", case, "--random-input-len", "5"])
    apply_use_case(ns)
    assert (ns.random_input_len, ns.random_output_len) == lens
