"""Weight repacking (llama.cpp's extra buffer types) and the AMX crash: every loading path decodes a multi-token
prompt under the repack decision, so a CI run on an Intel AMX machine catches a regression (issue: llama.cpp's
AMX matmul segfaults on every multi-token decode)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import run_cli
from sda_local import SDAEngine
from sda_local.models import hardware
from sda_local.errors import InputError
from sda_local.judging import make_judge
from sda_local.rubrics import RUBRICS

LONG_QUERY = "Explain, in a few sentences, why the sky looks blue during the day and red at sunset."


def test_repack_decision_follows_the_cpu(monkeypatch):
    monkeypatch.delenv(hardware.REPACK_ENV, raising=False)
    report = hardware.cpu_report()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        has_amx_flag = " amx_int8" in cpuinfo.read_text() or " amx_tile" in cpuinfo.read_text()
        assert ("amx_int8" in report.flags or "amx_tile" in report.flags) == has_amx_flag
    assert hardware.use_repack("auto") is (not report.amx)  # off exactly on AMX
    assert hardware.use_repack("on") is True and hardware.use_repack("off") is False
    monkeypatch.setenv(hardware.REPACK_ENV, "off")
    assert hardware.use_repack() is False
    monkeypatch.setenv(hardware.REPACK_ENV, "sometimes")
    with pytest.raises(InputError, match="SDA_LOCAL_REPACK must be one of auto, on, off"):
        hardware.use_repack()


def test_info_reports_cpu_features_and_the_repack_decision():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    cpu, repack = data["cpu"], data["repack"]
    assert cpu["model"] and isinstance(cpu["flags"], list) and isinstance(cpu["amx"], bool)
    assert repack["mode"] == "auto" and repack["use_extra_bufts"] is (not cpu["amx"])
    assert repack["reason"].startswith("AMX CPU") is cpu["amx"]
    forced = json.loads(run_cli("info", "--json", "--repack", "off").stdout)["repack"]
    assert forced == {"mode": "off", "use_extra_bufts": False, "reason": "repack=off"}
    text = run_cli("info").stdout.decode()
    assert "repack:" in text and "use_extra_bufts" in text


@pytest.mark.parametrize("streams", ["batched", "contexts"])
@pytest.mark.parametrize("repack", ["auto", "off"])
def test_engine_decodes_multi_token_prompts(model_path, streams, repack):
    with SDAEngine(str(model_path), n_ctx=512, n_threads=2, streams=streams, repack=repack) as engine:
        assert engine.model.repack is hardware.use_repack(repack)
        r = engine.generate(LONG_QUERY, "helpfulness", strength=0.5, seed=1, max_tokens=6)
        assert r.stats.prompt_tokens_with > 32 and r.stats.generated_tokens >= 1  # several ubatches decoded


def test_local_judge_on_another_model_file_loads_like_the_engine(model_path, monkeypatch):
    monkeypatch.setenv(hardware.REPACK_ENV, "off")
    judge = make_judge(f"local:{model_path}", None)
    try:
        assert judge.engine.model.repack is False
        assert 1 <= judge.score(LONG_QUERY, "Rayleigh scattering of sunlight.", RUBRICS["honesty"]).score <= 100
    finally:
        judge.close()


def test_cli_repack_flag_reaches_generate(model_path):
    proc = run_cli("generate", LONG_QUERY, "--align", "honesty", "--strength", "0.5", "-n", "6", "--seed", "1",
                   "--json", "--repack", "off", "--model", str(model_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["prompt_tokens_with"] > 32


def test_bench_llama_cpp_python_arm_loads_under_the_decision(model_path, tmp_path):
    """The plain llama-cpp-python arm (Llama has no repack argument) is loaded under the decision and counts tokens."""
    import llama_cpp

    with hardware.llama_cpp_repack("off"):
        llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
        out = llm.create_completion(LONG_QUERY, max_tokens=4, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
        assert out["usage"]["prompt_tokens"] > 16 and out["usage"]["completion_tokens"] == 4
    finally:
        llm.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored afterwards
    proc = subprocess.run([sys.executable, "-m", "sda_local.bench", "llama-cpp-python", str(model_path), "2", "24",
                           "512"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_second"] > 0


def test_llama_cpp_server_started_through_sda_local_decodes(model_path):
    """The remote-judge test server: llama-cpp-python's server under the repack decision."""
    from test_judges import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sda_local.models.hardware", "server", "--model", str(model_path),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2",
                             "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-500:]
            try:
                if requests.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        reply = requests.post(f"{url}/completions", json={"prompt": LONG_QUERY, "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 16
    finally:
        proc.terminate()
        proc.wait(timeout=30)
