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

from server_process import ServerProcess

openai = pytest.importorskip("openai")

QUERY = "How do I fix a flat bike tyre?"


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--parallel", "2", "-c", "2048", "--threads", "2", "--queue", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


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
    assert report["amplifier_source"] == "judge" and report["judge"].startswith("self:")
    assert 0 <= report["amplifier"] <= 0.5 and report["score"] is not None
    fixed = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Name three fruits."}],
                                           max_tokens=4, extra_body={"sda": {"align": "honesty", "judge": "none"}})
    assert fixed.model_extra["sda"]["amplifier"] == 0.5 and fixed.model_extra["sda"]["amplifier_source"] == "default"


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
    deadline = time.time() + 10
    while time.time() < deadline:
        busy = [line for line in requests.get(server.url + "/metrics").text.splitlines()
                if line.startswith("sda_slots_busy ")]
        if busy == ["sda_slots_busy 0"]:
            return
        time.sleep(0.1)
    pytest.fail(f"the slot stayed busy: {busy}")


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
    with ServerProcess("-m", str(model_path), "--api-key", "s3cret", "-c", "1024", "--parallel", "1",
                       "--threads", "2") as s:
        assert_error(post(s, CHAT, MESSAGES), 401, "invalid_api_key")
        assert_error(post(s, CHAT, {"messages": MESSAGES}, headers={"Authorization": "Bearer wrong"}), 401)
        ok = post(s, CHAT, {"messages": MESSAGES, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and requests.get(s.url + "/health").status_code == 200
        body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 2000,
                "stream": True}
        with post(s, CHAT, body, headers={"Authorization": "Bearer s3cret"}, stream=True) as response:
            lines = response.iter_lines()
            next(lines)
            started = time.time()
            assert s.stop() == 0
            assert time.time() - started < 8


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
    out = subprocess.run([llm, "-m", "sda-smollm2", "-o", "max_tokens", "8", "Name a colour."], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    logged = subprocess.run([llm, "logs", "--json", "-n", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(logged.stdout)[0]["response"] == out.stdout.strip()
