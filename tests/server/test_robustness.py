"""Disconnects free KV blocks, metrics, admission control, API key, SIGTERM drain, and crashes of either process."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import requests

from tests.server.conftest import ServerProc

M = "SmolLM2-135M-Instruct"


def _wait_idle(server: ServerProc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        running = sum(v for k, v in m.items() if k.startswith("llamaserve:num_requests_running"))
        waiting = sum(v for k, v in m.items() if k.startswith("llamaserve:num_requests_waiting"))
        usage = sum(v for k, v in m.items() if k.startswith("llamaserve:kv_cache_usage_perc"))
        if running == 0 and waiting == 0 and usage == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"server not idle: {server.metrics()}")


def test_streaming_clients_that_disconnect_free_their_blocks(server):
    _wait_idle(server)
    aborted_before = server.metric("llamaserve:request_success_total", finished_reason="abort")
    responses = []
    for i in range(10):
        r = requests.post(server.url + "/v1/completions", stream=True, timeout=60,
                          json={"prompt": f"Write a long story number {i}.", "max_tokens": 4000, "stream": True,
                                "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        while got < 3:  # read a few tokens, so the request is mid-stream
            if next(lines).startswith(b"data: "):
                got += 1
        responses.append(r)
    m = server.metrics()
    assert sum(v for k, v in m.items() if k.startswith("llamaserve:kv_cache_usage_perc")) > 0
    for r in responses:
        r.close()
    _wait_idle(server)
    assert server.metric("llamaserve:request_success_total", finished_reason="abort") - aborted_before == 10


def test_non_streaming_client_that_disconnects_is_aborted(server):
    _wait_idle(server)
    aborted_before = server.metric("llamaserve:request_success_total", finished_reason="abort")
    with pytest.raises(requests.Timeout):
        requests.post(server.url + "/v1/completions", timeout=2,
                      json={"prompt": "Tell me everything.", "max_tokens": 4000, "ignore_eos": True})
    _wait_idle(server)
    assert server.metric("llamaserve:request_success_total", finished_reason="abort") - aborted_before == 1


def test_metrics_have_vllm_names_and_count(server):
    before = server.metrics()
    r = requests.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Count: one two", "max_tokens": 5, "ignore_eos": True, "n": 2})
    assert r.status_code == 200
    after = server.metrics()
    names = {k.split("{")[0] for k in after}
    for want in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prompt_tokens_total", "generation_tokens_total", "request_success_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count"]:
        assert "llamaserve:" + want in names, want

    def delta(name: str) -> float:
        return sum(v for k, v in after.items() if k.startswith(name + "{")) - sum(
            v for k, v in before.items() if k.startswith(name + "{"))

    assert delta("llamaserve:generation_tokens_total") == 10
    assert delta("llamaserve:prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert delta("llamaserve:time_to_first_token_seconds_count") == 2
    assert delta("llamaserve:inter_token_latency_seconds_count") == 8
    assert delta("llamaserve:e2e_request_latency_seconds_count") == 2
    assert delta("llamaserve:request_queue_time_seconds_count") == 2
    assert delta("llamaserve:prefix_cache_queries_total") > 0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, smollm2_dir):
    srv = ServerProc(["--max-num-seqs", "1", "--max-queue-size", "1", "--cpu-kv-cache-gib", "0.5"],
                     tmp_path_factory.mktemp("guarded") / "server.log", env={"LLAMASERVE_API_KEY": "s3cret"})
    yield srv
    srv.stop()


def test_api_key_guards_everything_but_health(guarded):
    assert requests.get(guarded.url + "/health", timeout=10).status_code == 200
    for path in ["/v1/models", "/metrics", "/version", "/tokenizer_info", "/docs"]:
        r = requests.get(guarded.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert requests.get(guarded.url + path, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
        assert requests.get(guarded.url + path, headers={"Authorization": "Bearer s3cret"}, timeout=10).ok
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.completions.create(model=M, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_full_queue_gets_429_with_retry_after(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    body = {"prompt": "Go on and on.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    first = requests.post(guarded.url + "/v1/completions", json=body, headers=auth, stream=True, timeout=60)
    first_lines = first.iter_lines()  # keep a reference: a collected iterator closes the connection
    assert next(first_lines).startswith(b"data: ")  # running
    second = requests.post(guarded.url + "/v1/completions", json=body, headers=auth, stream=True, timeout=60)
    assert second.status_code == 200  # waiting (max_num_seqs 1), queue of 1 now full
    third = requests.post(guarded.url + "/v1/completions", json={**body, "stream": False}, headers=auth, timeout=60)
    assert third.status_code == 429, third.text
    assert third.headers["Retry-After"] == "1" and third.json()["error"]["type"] == "rate_limit_error"
    first.close()
    second.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # once they are aborted the server takes requests again
        r = requests.post(guarded.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth,
                          timeout=60)
        if r.status_code == 200:
            break
        time.sleep(0.3)
    assert r.status_code == 200


def _engine_pid(srv: ServerProc) -> int:
    return int(re.search(r"engine process pid (\d+)", srv.log()).group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    srv = ServerProc(["--cpu-kv-cache-gib", "0.5", "--shutdown-timeout", "60"], tmp_path / "server.log")
    engine = _engine_pid(srv)
    r = requests.post(srv.url + "/v1/completions", stream=True, timeout=120,
                      json={"prompt": "Once", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0})
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):  # no longer accepting
        requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
    rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]"
    assert len(rest) == 60  # 59 more tokens, the last with finish_reason, then [DONE]
    assert srv.proc.wait(60) == 0
    srv.stop()
    deadline = time.monotonic() + 10
    while _alive(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(engine)


def test_engine_crash_fails_in_flight_requests_and_exits_1(tmp_path):
    srv = ServerProc(["--cpu-kv-cache-gib", "0.5"], tmp_path / "server.log")
    r = requests.post(srv.url + "/v1/completions", stream=True, timeout=120,
                      json={"prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    os.kill(_engine_pid(srv), signal.SIGKILL)
    rest = [line for line in lines if line.startswith(b"data: ")]
    assert b'"error"' in rest[-2] and rest[-1] == b"data: [DONE]"
    assert srv.proc.wait(30) == 1
    srv.stop()
    assert "the engine" in srv.log()


def test_engine_exits_when_the_server_process_dies(tmp_path):
    srv = ServerProc(["--cpu-kv-cache-gib", "0.5"], tmp_path / "server.log")
    engine = _engine_pid(srv)
    assert _alive(engine)
    srv.stop(signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _alive(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(engine)


def test_port_in_use_is_a_clear_failure(tmp_path, server):
    port = int(server.url.rsplit(":", 1)[1])
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llamaserve", "serve", "--port", str(port), "--cpu-kv-cache-gib",
                          "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2  # a configuration error, found before the model loads
    assert "address already in use" in (out.stdout + out.stderr).lower()


def test_health_answers_quickly_under_load(server):
    """Sanity: /health answers quickly while requests run (the engine runs in its own process)."""
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 16}, timeout=60)

    t = threading.Thread(target=load)
    t.start()
    try:
        for _ in range(5):
            t0 = time.monotonic()
            assert requests.get(server.url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 2
    finally:
        stop.set()
        t.join()


def test_health_is_503_while_the_engine_is_not_stepping(tmp_path):
    srv = ServerProc(["--cpu-kv-cache-gib", "0.5", "--health-timeout", "2"], tmp_path / "server.log")
    engine = _engine_pid(srv)
    try:
        os.kill(engine, signal.SIGSTOP)  # alive but stuck: no step, no heartbeat
        time.sleep(3)
        r = requests.get(srv.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        os.kill(engine, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while requests.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.kill(engine, signal.SIGCONT)
        assert srv.stop() == 0
