"""``sda-local serve`` for real: a server process on 127.0.0.1 over the default model, driven by the openai SDK,
curl, plain HTTP and the ``llm`` CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from sda_local import SDAEngine

from server_process import ServerProcess, metric, openai_client

openai = pytest.importorskip("openai")

QUERY = "How do I fix a flat bike tyre?"


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--parallel", "2", "-c", "2048", "--threads", "2", "--queue", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def post(server, path, body=None, *, data=None, headers=None, **kwargs):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(server.url + path, data=data if data is not None else json.dumps(body), headers=headers,
                         timeout=120, **kwargs)


def assert_error(response, status, code=None, contains=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if contains is not None:
        assert contains in error["message"], error


# ---------------------------------------------------------------------------------------------- basics
def test_health_and_models(server):
    assert requests.get(server.url + "/health").json() == {"status": "ok"}
    models = requests.get(server.base + "/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_openai_sdk_plain_and_sda_match_the_engine(server, client, model_path):
    plain = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUERY}],
                                           max_tokens=12, seed=3)
    steered = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUERY}],
                                             max_tokens=12, seed=3, temperature=0.6,
                                             extra_body={"sda": {"align": "helpfulness", "strength": 0.5}})
    assert plain.usage.completion_tokens <= 12 and plain.choices[0].finish_reason in ("stop", "length")
    report = steered.model_extra["sda"]
    assert report["amplifier"] == 0.5 and report["amplifier_source"] == "strength" and report["mean_js"] > 0
    assert "sda" not in (plain.model_extra or {})
    # The same request through the Python API on its own engine: the same tokens, so the same text.
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2) as engine:
        local = engine.generate(QUERY, "helpfulness", strength=0.5, seed=3, max_tokens=12)
    assert steered.choices[0].message.content == local.text


def test_openai_sdk_streaming_with_usage_and_the_sda_report(client):
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}],
        max_tokens=16, seed=1, stream=True, stream_options={"include_usage": True},
        extra_body={"sda": {"align": "Answer in one short sentence.", "strength": 1.0}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and len(finals) == 1 and finals[0].model_extra["sda"]["amplifier"] == 1.0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_the_full_pipeline_sets_the_amplifier_with_the_server_judge(client):
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Name three fruits."}],
                                       max_tokens=16, seed=2, extra_body={"sda": {"align": "Answer without commas."}})
    report = r.model_extra["sda"]
    assert report["amplifier_source"] == "judge" and report["judge"] == "verify"  # a program checks "without commas"
    assert report["amplifier"] in (0.0, 1.0) and report["score"] in (0.0, 100.0)  # the verify judge's a
    selfjudged = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=16, seed=2,
        extra_body={"sda": {"align": "Answer like a friendly pirate."}}).model_extra["sda"]
    assert selfjudged["judge"].startswith("self:") and 0 <= selfjudged["amplifier"] <= 0.5
    fixed = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Name three fruits."}],
                                           max_tokens=4, extra_body={"sda": {"align": "honesty", "judge": "none"}})
    assert fixed.model_extra["sda"]["amplifier"] == 0.5 and fixed.model_extra["sda"]["amplifier_source"] == "default"


def test_a_judged_request_runs_the_pipelines_own_flow(client, engine, rows_batch_invariant):
    """The server and align() drive one AlignedJob: the same query, seed and options give the same first answer's
    judgement, the same a and the same steered answer (bit for bit where this CPU's rows are batch-invariant:
    the server decodes beside another slot's rows)."""
    from sda_local import align

    if not rows_batch_invariant:
        pytest.skip("this CPU's llama.cpp kernels round a row differently beside others (conftest)")
    query, instruction = "Name three rivers of Europe.", "Answer without commas."
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": query}], max_tokens=24,
                                       seed=11, extra_body={"sda": {"align": instruction, "show_judging": True}})
    report = r.model_extra["sda"]
    local = align(engine, query, instruction, max_tokens=24, seed=11)  # the default judge, as the server's
    assert report["amplifier_source"] == local.amplifier_source == "judge"
    assert report["amplifier"] == pytest.approx(local.amplifier, abs=1e-9)
    assert report["score"] == pytest.approx(local.score, abs=1e-6)
    assert r.choices[0].message.content == local.text
    assert local.initial_text in r.choices[0].message.model_extra["reasoning_content"]


def test_ignore_eos_runs_to_max_tokens(client):
    # "What is 2+2?" ends by itself (test_frontends); with llama-server's ignore_eos it runs to max_tokens.
    for extra in ({"ignore_eos": True}, {"ignore_eos": True, "sda": {"align": "honesty", "strength": 0.5}}):
        r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=48, seed=1, extra_body=extra)
        assert r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length", extra
    short = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           seed=1)  # no max_tokens, no ignore_eos: it ends by itself
    assert short.choices[0].finish_reason == "stop"


def test_completions_endpoint(client):
    r = client.completions.create(model="any", prompt="The capital of France is", max_tokens=6, seed=1)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.prompt_tokens > 0
    s = client.completions.create(model="any", prompt="The capital of France is", max_tokens=6, seed=1,
                                  extra_body={"sda": {"align": "honesty", "strength": 0.3}})
    assert s.model_extra["sda"]["amplifier"] == 0.3


def test_a_conversation_reuses_its_cached_prompt(client):
    messages = [{"role": "user", "content": QUERY}]
    first = client.chat.completions.create(model="any", messages=messages, max_tokens=16, seed=1,
                                           extra_body={"sda": {"align": "helpfulness", "strength": 0.5}})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And if the tyre keeps going flat?"}]
    second = client.chat.completions.create(model="any", messages=messages, max_tokens=8, seed=1,
                                            extra_body={"sda": {"align": "helpfulness", "strength": 0.5}})
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2


def test_curl_streams_server_sent_events(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": 8, "stream": True, "seed": 1,
            "sda": {"align": "honesty", "strength": 0.5}}
    out = subprocess.run([curl, "-sS", "-N", server.base + "/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["sda"]["amplifier"] == 0.5


def test_metrics(server, client):
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    text = requests.get(server.url + "/metrics").text
    for name in ("sda_requests_total", "sda_generated_tokens_total", "sda_queue_length", "sda_amplifier_mean",
                 "sda_js_mean", "sda_slots_busy"):
        assert f"\n{name}" in "\n" + text, name
    assert 'endpoint="/v1/chat/completions",status="200"' in text


def test_metrics_cannot_be_forged_or_grown(server):
    from prometheus_client.parser import text_string_to_metric_families

    forged = requests.get(server.url + "/a%22%7D%201%0Asda_fake_metric%201")
    assert forged.status_code == 404
    for i in range(200):
        requests.get(f"{server.url}/unknown/{i}")
    text = requests.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # a valid exposition
    assert "sda_fake_metric" not in families and "sda_fake_metric" not in text
    routes = {s.labels["endpoint"] for s in families["sda_requests"].samples if s.name == "sda_requests_total"}
    assert routes <= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "other"}
    other = [s.value for s in families["sda_requests"].samples
             if s.name == "sda_requests_total" and s.labels == {"endpoint": "other", "status": "404"}]
    assert other and other[0] >= 201


# ---------------------------------------------------------------------------------------------- errors
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_malformed_requests_get_openai_errors(server):
    assert_error(post(server, CHAT, data=b"{not json"), 400, "invalid_json")
    assert_error(post(server, CHAT, data=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400,
                 "invalid_encoding")
    assert_error(post(server, CHAT, data=b"[1, 2]"), 400, "invalid_json")
    assert_error(post(server, CHAT, MESSAGES, headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    assert_error(post(server, CHAT, data=big.encode()), 413, "request_too_large")
    assert_error(post(server, CHAT, {"messages": []}), 400)
    assert_error(requests.get(server.url + "/v1/nothing"), 404, "not_found")
    assert_error(requests.get(server.base + "/chat/completions"), 405)


@pytest.mark.parametrize("body,contains", [
    ({"messages": MESSAGES, "sda": {"align": "honesty", "strenght": 0.5}}, "sda.strenght: unknown field"),
    ({"messages": MESSAGES, "sda": {"align": "honesty", "strength": -0.5}}, "sda.strength"),
    ({"messages": MESSAGES, "sda": {"align": "honesty", "judge": "http://evil.example/v1"}}, "sda.judge"),
    ({"messages": MESSAGES, "sda": {"align": "honesty", "on_judge_failure": "fixed:-1"}}, "sda.on_judge_failure"),
    ({"messages": MESSAGES, "sda": {"align": "  "}}, "sda.align"),
    ({"messages": MESSAGES, "sda": {"align": "honsety"}}, "unknown preset"),
    ({"messages": MESSAGES, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": MESSAGES, "n": 2}, "only n = 1"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "last message must be a user message"),
    ({"messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"messages": MESSAGES, "seed": 2**32 - 1}, "seed"),
])
def test_invalid_parameters_are_400(server, body, contains):
    assert_error(post(server, CHAT, body), 400, contains=contains)


def test_a_prompt_over_the_slot_context(server):
    body = {"messages": [{"role": "user", "content": "word " * 1500}]}  # 1024 tokens per slot
    assert_error(post(server, CHAT, body), 400, "context_length_exceeded")


# ---------------------------------------------------------------------------------------------- concurrency
def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 1000,
            "stream": True, "sda": {"align": "helpfulness", "strength": 0.5}}
    with post(server, CHAT, body, stream=True) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    if not wait_until(lambda: slots_busy(server) == 0, 10):
        pytest.fail(f"the slot stayed busy: {slots_busy(server)}")


def test_past_the_queue_the_server_answers_429(model_path):
    with ServerProcess("-m", str(model_path), "--parallel", "1", "--queue", "0", "-c", "512", "--threads", "2") as s:
        # 400 tokens for this seed (checked), several seconds on 2 cores
        body = {"messages": [{"role": "user", "content": "Write the numbers from 1 to 200, one per line."}],
                "max_tokens": 400, "seed": 1, "stream": True}
        with post(s, CHAT, body, stream=True) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            assert running.status_code == 200 and next(lines).startswith(b"data: ")
            refused = post(s, CHAT, {"messages": MESSAGES, "max_tokens": 2})
            assert_error(refused, 429, "server_busy")
            assert refused.headers["Retry-After"] == "1"
        deadline = time.time() + 10
        while post(s, CHAT, {"messages": MESSAGES, "max_tokens": 2}).status_code == 429 and time.time() < deadline:
            time.sleep(0.2)
        assert post(s, CHAT, {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_api_key_and_sigterm_during_a_stream(model_path):
    with ServerProcess("-m", str(model_path), "--api-key", "s3cret", "-c", "4096", "--parallel", "1",
                       "--threads", "2") as s:
        assert_error(post(s, CHAT, MESSAGES), 401, "invalid_api_key")
        assert_error(post(s, CHAT, {"messages": MESSAGES}, headers={"Authorization": "Bearer wrong"}), 401)
        ok = post(s, CHAT, {"messages": MESSAGES, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and requests.get(s.url + "/health").status_code == 200
        # ignore_eos: the answer cannot end by itself within the server's 5 s of graceful shutdown (a story the
        # model chose to finish early ended with "stop" on a fast run, and failed this test).
        body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 4000,
                "stream": True, "ignore_eos": True}
        with post(s, CHAT, body, headers={"Authorization": "Bearer s3cret"}, stream=True) as response:
            lines = response.iter_lines()
            next(lines)
            # SIGTERM mid-stream: a clean exit (no kill after the timeout, however loaded the machine is), and the
            # generation was cut, not finished first: no chunk of the rest ends it with "stop" or "length".
            assert s.stop(timeout=120) == 0
            rest = []
            try:
                rest.extend(line for line in lines if line.startswith(b"data: {"))
            except requests.exceptions.ChunkedEncodingError:  # the connection closed mid-stream: cut, as it should
                pass
        ends = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in rest
                if json.loads(line[6:]).get("choices")]
        assert not {"stop", "length"} & set(ends), ends


def test_binding_beyond_loopback_without_a_key_warns(model_path):
    port = _free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "sda-local"), "serve", "-m",
                             str(model_path), "--host", "0.0.0.0", "--port", str(port), "-c", "256", "--parallel",
                             "1"], stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(15)
    assert first.startswith("warning: listening on 0.0.0.0 without --api-key")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- llm CLI
def test_the_llm_cli_through_its_openai_compatible_configuration(server, tmp_path):
    llm = os.path.join(os.path.dirname(sys.executable), "llm")
    if not os.path.exists(llm):
        pytest.skip("the llm CLI is not installed")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: sda-smollm2\n  model_name: any\n  api_base: \"{server.base}\"\n")
    env = dict(os.environ, LLM_USER_PATH=str(tmp_path))
    out = subprocess.run([llm, "-m", "sda-smollm2", "-o", "max_tokens", "8", "-o", "seed", "1", "Name a colour."],
                         capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    logged = subprocess.run([llm, "logs", "--json", "-n", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(logged.stdout)[0]["response"] == out.stdout.strip()


def slots_busy(server) -> float:
    """The server's sda_slots_busy gauge now."""
    return metric(server, "sda_slots_busy")


def wait_until(condition, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a wait, never a timing assertion)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _chat_requests_by_status(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics").text
    counts = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sda_requests_total" and s.labels.get("endpoint") == CHAT:
                counts[s.labels["status"]] = s.value
    return counts


def test_a_client_that_disconnects_is_logged_as_such_not_a_server_error(server):
    before = _chat_requests_by_status(server)
    # A prompt that this model answers at length (1500 tokens, seeds 1 and 2 checked): still running when
    # the client goes.
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long essay about the history of "
                                     "Rome, with at least 40 paragraphs."}], "max_tokens": 1500, "seed": 1}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(lambda: slots_busy(server) > 0, 60)  # the generation has started (a wait, not an assertion)
    sock.close()
    wait_until(lambda: _chat_requests_by_status(server).get("499", 0) > before.get("499", 0), 60)
    after = _chat_requests_by_status(server)
    assert after.get("499", 0) == before.get("499", 0) + 1, after
    assert after.get("500", 0) == before.get("500", 0)
    # ... and its slot was given back
    if not wait_until(lambda: slots_busy(server) == 0, 60):
        pytest.fail("the slot stayed busy after the client left")


def test_slow_sockets_are_closed_while_normal_requests_are_answered(tmp_path):
    # 50 slowloris sockets, one byte a second: half still in their headers, half in a body. The server
    # answers 408 and closes each at its deadline, and answers normal requests meanwhile.
    import select
    import threading

    header_timeout, body_timeout = 3.0, 3.0
    with ServerProcess("--parallel", "1", "-c", "1024", "--threads", "2", "--header-timeout", str(header_timeout),
                       "--body-timeout", str(body_timeout)) as s:
        port = int(s.url.rsplit(":", 1)[1])
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert post(s, CHAT, body).status_code == 200  # warm: the first request's one-off costs are not counted
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        slow = []  # (socket, bytes still to send)
        for i in range(50):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                sock.sendall(head + b"Content-Length: 1000\r\n\r\n{")  # headers in, the body trickles
                slow.append([sock, b'"' * 999])
            else:
                slow.append([sock, head + b"Content-Length: 2\r\n\r\n{}"])  # the headers trickle
        opened = time.time()
        closed_after, answers, latencies = {}, [], []

        def normal_requests():  # meanwhile, from another thread, so that the slow sockets are watched all along
            for _ in range(10):
                started = time.time()
                answers.append(post(s, CHAT, body).status_code)
                latencies.append(time.time() - started)
                time.sleep(0.3)

        client = threading.Thread(target=normal_requests)
        client.start()
        deadline = opened + 10 * max(header_timeout, body_timeout) + 60
        next_byte = opened
        while len(closed_after) < len(slow) and time.time() < deadline:
            if time.time() >= next_byte:  # one byte a second on every open slow socket
                next_byte += 1.0
                for i, (sock, rest) in enumerate(slow):
                    if i in closed_after or not rest:
                        continue
                    try:
                        sock.send(rest[:1])
                        slow[i][1] = rest[1:]
                    except OSError:
                        closed_after[i] = (time.time() - opened, b"")
            readable, _, _ = select.select([sock for i, (sock, _) in enumerate(slow) if i not in closed_after],
                                           [], [], 0.05)
            for sock in readable:
                i = next(j for j, (x, _) in enumerate(slow) if x is sock)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                closed_after[i] = (time.time() - opened, data)
        client.join(300)
        for sock, _ in slow:
            sock.close()
        assert len(closed_after) == 50, f"{50 - len(closed_after)} slow sockets were never closed"
        assert all(data.startswith(b"HTTP/1.1 408") or data == b"" for _, data in closed_after.values())
        # A byte sent just as the server closes can turn the 408 into a reset: most, not all, see the 408.
        assert sum(data.startswith(b"HTTP/1.1 408") for _, data in closed_after.values()) >= 20
        assert answers == [200] * 10, answers
        # A connection that sends nothing, and a keep-alive one after its answer, are closed silently: a
        # client reusing an idle connection must see it closed (and retry), never a 408 it takes for its answer.
        idle = socket.create_connection(("127.0.0.1", port))
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in (idle, kept):
            sock.settimeout(60)
            received = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
            sock.close()
            assert b"408" not in received, received
            assert received.count(b"HTTP/1.1 ") == (1 if sock is kept else 0)
        latencies.sort()
        print(f"\nslow sockets: closed after {min(t for t, _ in closed_after.values()):.1f}-"
              f"{max(t for t, _ in closed_after.values()):.1f} s (deadlines {header_timeout:g}/{body_timeout:g} s); "
              f"normal requests meanwhile: median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
              f"max {latencies[-1] * 1000:.0f} ms")


def test_completions_take_a_raw_prompt(server, engine):
    # /v1/completions is a raw prompt, as llama-server's: its control tokens are the caller's and no chat
    # template is put around it. With sda, the with-stream reads the instruction (plain text) before it.
    from sda_local.prompts import resolve_alignment

    raw = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    plain = post(server, "/v1/completions", {"prompt": raw, "max_tokens": 2, "seed": 1}).json()
    assert plain["usage"]["prompt_tokens"] == len(engine.prompt_tokens(raw))
    im_start = engine.model.tokenize("<|im_start|>", add_bos=False, special=True)
    assert engine.prompt_tokens(raw).count(im_start[0]) == 2
    steered = post(server, "/v1/completions", {"prompt": raw, "max_tokens": 2, "seed": 1,
                                               "sda": {"align": "honesty", "strength": 0.5}}).json()
    instruction = resolve_alignment("honesty").instruction
    # The instruction has no special-token text: the same tokens as the whole string.
    expected = engine.model.tokenize(instruction + "\n\n" + raw, add_bos=False, special=True)
    assert steered["usage"]["prompt_tokens"] == len(expected)


def test_judged_requests_under_load_keep_their_slot_for_the_steered_answer():
    # One slot, three judged requests at once: each observed first answer holds the slot for its own steered
    # answer, which finds its with-prompt cached whole, though two other requests were queued before it.
    from concurrent.futures import ThreadPoolExecutor

    questions = ["Name three fruits.", "Why is the sky blue?", "How do plants grow?"]
    with ServerProcess("--parallel", "1", "-c", "1024", "--threads", "2", "--queue", "8") as one_slot:
        client = openai_client(one_slot)

        def ask(question):
            return client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": question}], max_tokens=8, seed=3,
                extra_body={"sda": {"align": "Answer like a friendly pirate."}})  # the self judge's observed answer

        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(ask, questions))
    for r in answers:
        assert r.model_extra["sda"]["judge"] is not None  # judged: the server's self judge set a
        assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1, r.usage
