"""The ``llm`` plugin, driven through the real ``llm`` CLI in a subprocess on the real default model, with its
user directory (keys, logs, registered models) in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sda_local.judging.selfscore import A_MAX

LLM = os.path.join(os.path.dirname(sys.executable), "llm")
pytestmark = pytest.mark.skipif(not os.path.exists(LLM), reason="the llm CLI is not installed")
STEER = ["-o", "align", "Answer in fewer than 10 words.", "-o", "strength", "0.5", "-o", "seed", "1",
         "-o", "max_tokens", "24"]


@pytest.fixture
def run_llm(tmp_path):
    env = dict(os.environ, LLM_USER_PATH=str(tmp_path / "llm"))

    def run(*args, timeout=300):
        return subprocess.run([LLM, *args], capture_output=True, text=True, env=env, timeout=timeout)

    return run


def last_log(run_llm):
    out = run_llm("logs", "-n", "1", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_models_lists_sda(run_llm):
    out = run_llm("models")
    assert out.returncode == 0 and "sda-local: sda\n" in out.stdout, out.stdout + out.stderr


def test_streamed_and_no_stream_give_the_same_answer_and_log_the_pipeline(run_llm):
    streamed = run_llm("-m", "sda", *STEER, "Describe the sea")
    assert streamed.returncode == 0 and streamed.stdout.strip(), streamed.stderr
    logged = last_log(run_llm)
    assert logged["model"] == "sda" and logged["response"] == streamed.stdout.strip()
    r = logged["response_json"]
    assert r["amplifier"] == 0.5 and r["amplifier_source"] == "strength" and r["seed"] == 1
    assert r["fusion_backend"] == "native" and r["mean_js"] > 0 and r["mean_temperature"] > 0
    assert logged["input_tokens"] > 0 and 0 < logged["output_tokens"] <= 24
    whole = run_llm("-m", "sda", *STEER, "--no-stream", "Describe the sea")
    assert whole.returncode == 0 and whole.stdout == streamed.stdout, whole.stderr


def test_the_judge_sets_the_amplifier_and_plain_generation_has_none(run_llm):
    judged = run_llm("-m", "sda", "-o", "align", "Answer without commas.", "-o", "max_tokens", "12", "-o", "seed",
                     "2", "Name three fruits.")
    assert judged.returncode == 0, judged.stderr
    r = last_log(run_llm)["response_json"]
    assert r["amplifier_source"] == "judge" and r["judge"] == "verify" and r["amplifier"] in (0.0, 1.0)
    assert r["amplifier"] == (0.0 if r["score"] == 100 else 1.0)  # the verify judge's a
    plain = run_llm("-m", "sda", "-o", "max_tokens", "8", "-o", "seed", "3", "Name a colour.")
    assert plain.returncode == 0, plain.stderr
    r = last_log(run_llm)["response_json"]
    assert "amplifier" not in r and r["fusion_backend"] is None


def test_a_two_turn_conversation_carries_its_history(run_llm):
    first = run_llm("-m", "sda", "-o", "align", "honesty", "-o", "strength", "0.5", "-o", "max_tokens", "16",
                    "-o", "seed", "4", "-s", "You are a terse assistant.", "My name is Ada. Say hello.")
    assert first.returncode == 0, first.stderr
    opening = last_log(run_llm)
    second = run_llm("-c", "-o", "align", "honesty", "-o", "strength", "0.5", "-o", "max_tokens", "16",
                     "-o", "seed", "4", "What is my name?")
    assert second.returncode == 0 and second.stdout.strip(), second.stderr
    follow = last_log(run_llm)
    assert follow["conversation_id"] == opening["conversation_id"] and follow["model"] == "sda"
    # The history is in the prompt: the second turn's prompt holds the first exchange.
    # The history is in the prompt (its retokenized text can be shorter than the tokens generated).
    assert follow["input_tokens"] > opening["input_tokens"] + 4


@pytest.mark.parametrize("options,fragment", [
    (["-o", "strength", "-1"], "strength"),
    (["-o", "align", ""], "align"),
    (["-o", "bogus", "1"], "bogus"),
    (["-o", "top_p", "2"], "top_p"),
    (["-o", "streams", "three"], "streams"),
    (["-o", "cache_type_v", "q8_0", "-o", "flash_attn", "off"], "a quantized V cache needs flash attention"),
])
def test_bad_options_are_llm_errors_without_a_traceback(run_llm, options, fragment):
    out = run_llm("-m", "sda", *options, "Hi")
    assert out.returncode != 0 and out.stderr.startswith(f"Error: {fragment}"), out.stderr
    assert "Traceback" not in out.stderr


def test_registered_models_and_a_missing_file(run_llm, model_path, tmp_path):
    copy = tmp_path / "mine.gguf"
    shutil.copyfile(model_path, copy)
    out = run_llm("sda", "register", str(copy), "--name", "mine")
    assert out.returncode == 0, out.stderr
    assert "sda-local: sda-mine" in run_llm("models").stdout
    ok = run_llm("-m", "sda-mine", "-o", "max_tokens", "4", "Hi")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    copy.unlink()
    gone = run_llm("-m", "sda-mine", "-o", "max_tokens", "4", "Hi")
    assert gone.returncode != 0 and gone.stderr.startswith("Error: ") and "Traceback" not in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    refused = run_llm("sda", "register", str(tmp_path / "nothing.gguf"), "--name", "x")
    assert refused.returncode != 0 and "no such file" in refused.stderr


def test_kv_cache_options(run_llm):
    out = run_llm("-m", "sda", "-o", "cache_type_k", "q8_0", "-o", "cache_type_v", "q8_0", "-o", "max_tokens", "6",
                  "-o", "seed", "2", "Name a colour.")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
