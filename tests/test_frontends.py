"""What chat front ends expect of ``sda-local serve`` (issue "A browser UI…", part 2 and 3), on a real server
process over the default model: no silent truncation, refused fields named, JSON mode, logprobs of the
distribution sampled, per-token SDA figures, judging as reasoning_content, keep-alives, CORS, /v1/models/{id}."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
from scipy.special import log_softmax

from sda_local.engine.fusion import DEFAULT_T0
from sda_local.engine.steering import DEFAULT_STEERING, EchoTracker, fuse_steered_numpy
from sda_local.prompts import resolve_alignment
from sda_local.server.schemas import UNSUPPORTED_FIELDS

from fault_server import FaultServer
from server_process import ServerProcess, openai_client

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name a colour."}]
JSON_MESSAGES = [{"role": "user", "content": "Give me a JSON object describing a cat with its name and age."}]
SDA = {"align": "helpfulness", "judge": "none"}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--parallel", "2", "-c", "4096", "--threads", "2", "--sse-keepalive", "0.5") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


def post(server, body, path="/v1/chat/completions", **kwargs):
    return requests.post(server.url + path, json=body, timeout=300, **kwargs)


def events(response):
    """The SSE lines of a streamed response: ("data", parsed or "[DONE]") and ("comment", text)."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        if line.startswith(":"):
            out.append(("comment", line[1:].strip()))
        elif line.startswith("data: "):
            data = line[6:]
            out.append(("data", data if data == "[DONE]" else json.loads(data)))
    return out


# ------------------------------------------------------------------------------- no silent truncation
def test_no_max_tokens_runs_to_a_natural_end(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is 2+2?"}], seed=1)
    assert r.choices[0].finish_reason == "stop"
    # the old default cut answers at 512 tokens; a natural end is an EOS, whatever the length
    assert r.usage.completion_tokens > 0


@pytest.mark.slow
def test_no_max_tokens_runs_past_the_old_512_cut(client):
    # a raw count the model carries on with: it ends by EOS or by the slot's context (2048), never by a default
    r = client.completions.create(model="m", seed=1, prompt=", ".join(str(i) for i in range(1, 40)) + ",")
    assert r.usage.completion_tokens > 512, r.choices[0].text[-200:]


def test_no_max_tokens_on_completions_is_not_cut_at_16(client):
    r = client.completions.create(model="m", prompt="Once upon a time", seed=3)
    assert r.usage.completion_tokens > 16 or r.choices[0].finish_reason == "stop"


# -------------------------------------------------------------------------------------- refused fields
REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "logit_bias": {"42": 5},
    "presence_penalty": 0.5,
    "frequency_penalty": -0.3,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "best_of": 3,
    "echo": True,
    "suffix": "the end",
}
NEUTRAL = {"tool_choice": "none", "function_call": "none", "parallel_tool_calls": False, "logit_bias": {},
           "presence_penalty": 0, "frequency_penalty": 0.0, "modalities": ["text"], "best_of": 1, "echo": False,
           "tools": [], "suffix": ""}
# What clients send by default with no tools: without effect, so accepted.
HARMLESS = {"tool_choice": "auto", "function_call": "auto", "parallel_tool_calls": True, "logprobs": None}


def test_the_refused_list_is_the_one_tested():
    assert set(REFUSED) == set(UNSUPPORTED_FIELDS)


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unimplemented_field_is_a_400_naming_it(server, name, path):
    body = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Hi"}
    body.update({name: REFUSED[name], "max_tokens": 1})
    r = post(server, body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_field"
    assert error["message"].startswith(name + " is not supported")


@pytest.mark.parametrize("fields", [NEUTRAL, HARMLESS], ids=["neutral", "no-effect"])
def test_neutral_values_of_those_fields_are_accepted(server, fields):
    r = post(server, {"messages": MESSAGES, "max_tokens": 1, **fields})
    assert r.status_code == 200, r.text


def test_completions_logprobs_false_is_off(server):
    r = post(server, {"prompt": "Hi", "max_tokens": 2, "logprobs": False}, "/v1/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"top_logprobs": 2}, None),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    # llama.cpp's converter cannot take an unanchored pattern: a 400 before any generation, not a 500
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "abc"}}}},
     None),
])
def test_other_refusals(server, body, param):
    r = post(server, {"messages": MESSAGES, "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param


# ------------------------------------------------------------------------------------------ JSON mode
@pytest.mark.slow
@pytest.mark.parametrize("sda", [None, SDA], ids=["plain", "sda"])
def test_json_object_parses_in_20_of_20_seeds(client, sda):
    for seed in range(20):
        r = client.chat.completions.create(model="m", messages=JSON_MESSAGES, seed=seed,
                                           response_format={"type": "json_object"},
                                           extra_body={"sda": sda} if sda else None)
        text = r.choices[0].message.content
        assert isinstance(json.loads(text), dict), (seed, text)
        assert r.choices[0].finish_reason == "stop"


def test_llama_server_json_object_with_schema(server):
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    r = post(server, {"messages": JSON_MESSAGES, "seed": 1, "response_format": {"type": "json_object", "schema": schema}})
    assert list(json.loads(r.json()["choices"][0]["message"]["content"])) == ["age"]


def test_json_with_logprobs(client):
    r = client.chat.completions.create(model="m", messages=JSON_MESSAGES, seed=2, response_format={"type": "json_object"},
                                       logprobs=True, top_logprobs=2, extra_body={"sda": SDA})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # the grammar's mask is in the distribution reported: the first token can only open the object
    assert content[0].top_logprobs and all(t.token.startswith("{") for t in content[0].top_logprobs)


@pytest.mark.parametrize("sda", [None, SDA], ids=["plain", "sda"])
def test_json_schema_is_followed(client, sda):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="m", messages=JSON_MESSAGES, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
            extra_body={"sda": sda} if sda else None)
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)


# ------------------------------------------------------------------------------------------- logprobs
def _numpy_first_step(engine, sda, query, t0=DEFAULT_T0):
    """The log-probabilities the first answer token is drawn from, recomputed from the raw rows."""
    f = engine.formatter
    if sda is None:
        request = engine.request(f.render(None, query), None, max_tokens=1, seed=0, capture_logits=True)
    else:
        prompt_with, prompt_without = f.pair(query, resolve_alignment(sda["align"]))
        request = engine.request(prompt_with, prompt_without, strength=sda["strength"], max_tokens=1, seed=0,
                                 capture_logits=True, instruction=resolve_alignment(sda["align"]).instruction)
    job = engine.submit(request)
    engine.scheduler.wait(job)
    z_with, z_without = job.first_logits
    if sda is None:
        return log_softmax(z_with.astype(np.float64) / np.float32(t0))
    guard = request.guard
    guarded = EchoTracker.of(guard, DEFAULT_STEERING.echo_run).guarded() if guard.sources else None
    strength = sda["strength"] if DEFAULT_STEERING.onset < 1 else 0.0  # the first token: before the onset?
    fused, _, _ = fuse_steered_numpy(z_with, z_without, strength, DEFAULT_STEERING, guarded, k=request.k,
                                     t0=request.t0, temperature_mode=request.temperature_mode, capped=guard.capped,
                                     forbidden=guard.forbidden)
    return log_softmax(fused.astype(np.float64))


@pytest.mark.parametrize("sda", [None, {"align": "helpfulness", "strength": 0.5}], ids=["plain", "sda"])
def test_logprobs_are_the_distribution_sampled(client, engine, sda):
    query = "Name a colour."
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": query}], seed=4,
                                       max_tokens=6, logprobs=True, top_logprobs=3,
                                       extra_body={"sda": sda} if sda else None)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1 + 1e-9
        assert entry.logprob <= tops[0] + 1e-12
        if any(t.token == entry.token for t in entry.top_logprobs):
            assert entry.logprob == next(t.logprob for t in entry.top_logprobs if t.token == entry.token)
    expected = _numpy_first_step(engine, sda, query)
    best = np.argsort(-expected)[:3]
    first = content[0]
    for got, token in zip(first.top_logprobs, best):
        assert got.bytes == list(engine.model.piece(int(token)))
        assert abs(got.logprob - expected[token]) < 1e-4


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model="m", prompt="The capital of France is", max_tokens=4, seed=1, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)


def test_completion_text_offsets_count_characters_of_the_answer(server):
    # Accents and emoji: a token may end inside a character; offsets index the answer's characters.
    for seed in range(3):
        r = post(server, {"prompt": "Café, crème brûlée et 😀 :", "max_tokens": 24, "seed": seed, "logprobs": 0},
                 "/v1/completions").json()
        text, offsets = r["choices"][0]["text"], r["choices"][0]["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(text)


# ------------------------------------------------------------------------------- SDA per-token figures
def test_token_stats_per_token(server):
    sda = {"align": "helpfulness", "strength": 1.0, "token_stats": True}
    whole = post(server, {"messages": MESSAGES, "max_tokens": 12, "seed": 2, "sda": sda}).json()
    tokens = whole["sda"]["tokens"]
    assert len(tokens) == whole["usage"]["completion_tokens"]
    assert "".join(t["text"] for t in tokens) == whole["choices"][0]["message"]["content"]
    assert all(0 <= t["js"] <= math.log(2) + 1e-6 and t["temperature"] > 0 and t["prompt_top"] for t in tokens)
    if whole["choices"][0]["finish_reason"] == "length":  # every step sampled a token: the means agree
        assert abs(np.mean([t["js"] for t in tokens]) - whole["sda"]["mean_js"]) < 1e-5
    with post(server, {"messages": MESSAGES, "max_tokens": 12, "seed": 2, "sda": sda, "stream": True},
              stream=True) as r:
        streamed = [t for kind, data in events(r) if kind == "data" and data != "[DONE]"
                    for t in (data.get("sda") or {}).get("tokens", [])]
    assert streamed == tokens  # same seed, same tokens, same figures


def test_token_stats_texts_are_whole_characters(server):
    # Accented letters and an emoji: tokens that end inside a UTF-8 character add "" and the next one adds
    # the character, so the texts always join into the answer and never hold a replacement character.
    sda = {"align": "Answer in French, with emoji.", "strength": 0.5, "token_stats": True}
    for seed in range(3):
        whole = post(server, {"messages": [{"role": "user", "content": "Décris un café à Paris 😀☕"}],
                              "max_tokens": 40, "seed": seed, "sda": sda}).json()
        texts = [t["text"] for t in whole["sda"]["tokens"]]
        content = whole["choices"][0]["message"]["content"]
        joined = "".join(texts)
        assert not any("\ufffd" in t for t in texts) and content.startswith(joined)
        # only an answer cut by max_tokens inside a character ends with bytes of no token (shown as U+FFFD)
        assert content == joined or (whole["choices"][0]["finish_reason"] == "length"
                                     and set(content[len(joined):]) == {"\ufffd"})


# ----------------------------------------------------------------------------- judging and keep-alives
def test_judging_streams_as_reasoning_content(server):
    body = {"messages": MESSAGES, "max_tokens": 8, "seed": 1, "stream": True, "sda": {"align": "helpfulness"}}
    with post(server, body, stream=True) as r:
        assert r.headers["X-Accel-Buffering"] == "no"
        seen = events(r)
    datas = [d for kind, d in seen if kind == "data" and d != "[DONE]"]
    reasoning = "".join(d["choices"][0]["delta"].get("reasoning_content", "") for d in datas if d["choices"])
    content = "".join(d["choices"][0]["delta"].get("content") or "" for d in datas if d["choices"])
    report = datas[-1]["sda"]
    assert report["amplifier_source"] == "judge" and content
    assert reasoning.rstrip().endswith(f"a = {report['amplifier']:.3g}")
    first_reasoning = next(i for i, d in enumerate(datas) if d["choices"][0]["delta"].get("reasoning_content"))
    first_content = next(i for i, d in enumerate(datas) if d["choices"][0]["delta"].get("content"))
    assert first_reasoning < first_content
    body["sda"] = {"align": "helpfulness", "show_judging": False}
    with post(server, body, stream=True) as r:
        quiet = [d for kind, d in events(r) if kind == "data" and d != "[DONE]"]
    assert not any(d["choices"] and "reasoning_content" in d["choices"][0]["delta"] for d in quiet)


def test_a_slow_judge_keeps_the_stream_alive(model_path):
    # The judge answers after 3 s (a real socket); the server, set to 0.5 s, fills the silence with comments.
    # Both kinds: chat without showing the judging, and /v1/completions, whose first answer sends nothing (it
    # has no reasoning field), so only comments can fill the first answer and the judge's call.
    with FaultServer([("delay", 3.0, ("score", 70))]) as judge, \
            ServerProcess("--model", str(model_path), "--judge-url", judge.url, "--sse-keepalive", "0.5",
                          "--threads", "2", "--parallel", "1") as s:
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
            body.update(max_tokens=4, seed=1, stream=True, sda={"align": "helpfulness", "show_judging": False})
            with post(s, body, path, stream=True) as r:
                seen = events(r)
            answer = [i for i, (kind, d) in enumerate(seen) if kind == "data" and d != "[DONE]" and d["choices"]
                      and (d["choices"][0].get("text") or d["choices"][0].get("delta", {}).get("content"))]
            comments_before_answer = [i for i, (kind, _) in enumerate(seen) if kind == "comment" and i < answer[0]]
            assert len(comments_before_answer) >= 2, (path, seen)
            assert seen[-1] == ("data", "[DONE]")
            final = [d for kind, d in seen if kind == "data" and d != "[DONE]" and d.get("sda")][-1]["sda"]
            assert final["amplifier_source"] == "judge" and final["score"] == 70
        # a follow-up is judged in its conversation: the judge is sent the earlier turns
        history = [{"role": "user", "content": "Name two fruits."},
                   {"role": "assistant", "content": "Apples and mangoes."},
                   {"role": "user", "content": "And the second one, what colour is it?"}]
        r = post(s, {"messages": history, "max_tokens": 4, "seed": 1, "sda": {"align": "helpfulness"}})
        assert r.status_code == 200 and r.json()["sda"]["score"] == 70
        sent = judge.requests[-1]["json"]["messages"][1]["content"]
        assert "Apples and mangoes." in sent and "what colour is it?" in sent


# ------------------------------------------------------------------------------- models and CORS
def test_model_by_id(server):
    listed = requests.get(server.base + "/models").json()["data"][0]
    one = requests.get(server.base + "/models/" + listed["id"])
    assert one.status_code == 200 and one.json() == listed
    missing = requests.get(server.base + "/models/other-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_cors_is_off_by_default(server):
    r = requests.options(server.base + "/chat/completions", headers={
        "Origin": "http://front.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origin_with_api_key(model_path):
    with ServerProcess("--model", str(model_path), "--cors-origin", "http://front.example", "--api-key", "k",
                       "--threads", "2", "--parallel", "1") as s:
        preflight = requests.options(s.base + "/chat/completions", headers={
            "Origin": "http://front.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://front.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        other = requests.options(s.base + "/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
        r = requests.post(s.base + "/chat/completions", json={"messages": MESSAGES, "max_tokens": 1},
                          headers={"Origin": "http://front.example", "Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://front.example"
        assert requests.post(s.base + "/chat/completions", json={"messages": MESSAGES}).status_code == 401


# ------------------------------------------------------------------------------- failure mid-stream
def test_any_exception_mid_stream_ends_with_an_error_event_and_done(engine):
    """Whatever the failure (here a plain RuntimeError after the first piece), the client gets an error event
    and [DONE], never a cut connection."""
    import asyncio

    from sda_local.server.app import _stream
    from sda_local.server.service import Delta, Plan
    from sda_local.server.shapes import Shaper

    class FailingService:
        model_id = "m"

        async def run(self, plan):
            yield Delta(content="Hello")
            raise RuntimeError("a defect")

    plan = Plan(engine.request("Hi", None, max_tokens=2), None, None)
    shaper = Shaper(engine.model, "m", plan, "chat", "chatcmpl-x")

    async def collect():
        return [event async for event in _stream(FailingService(), plan, shaper, False, 5.0)]

    out = asyncio.run(collect())
    assert json.loads(out[1][6:])["choices"][0]["delta"]["content"] == "Hello"
    error = json.loads(out[-2][6:])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert out[-1] == "data: [DONE]\n\n"


def test_llama_server_no_limit_is_accepted(server):
    r = post(server, {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": -1, "seed": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert post(server, {"messages": MESSAGES, "max_tokens": 0}).status_code == 400


def test_bad_cors_origin_is_one_line():
    from conftest import run_cli

    out = run_cli("serve", "--cors-origin", "localhost:3000/app", "--port", "0")
    err = out.stderr.decode()
    assert out.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--cors-origin 'localhost:3000/app' is not an origin" in err


def test_serve_prints_the_kv_memory_at_load(server):
    # 2 slots of 2048 tokens on the default model: 2 streams x 2048 x 22.5 KiB per slot
    assert any("KV cache (f16/f16): 90 MiB per slot, 180 MiB for 2 slots" in line for line in server.stderr_lines), \
        server.stderr_lines
