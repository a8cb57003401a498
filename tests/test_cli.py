"""The real ``sda-local`` executable: streaming, JSON, batch with resume, info, models, and bad input."""

from __future__ import annotations

import json
import os
import platform

import pytest

from conftest import run_cli
from sda_local.models import hardware

QUERY = "How do I fix a flat bike tyre?"


def assert_one_line_error(proc, *fragments):
    err = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert len([line for line in lines if line.startswith("error: ")]) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], err


def test_generate_streams_the_answer(model_path):
    args = ("generate", QUERY, "--align", "helpfulness", "--strength", "0.5", "--seed", "1", "--max-tokens", "24",
            "--model", str(model_path))
    proc = run_cli(*args, "--stats")
    assert proc.returncode == 0, proc.stderr
    # The streamed text is the answer the same call gives as JSON, and the stats line describes that answer.
    data = json.loads(run_cli(*args, "--json").stdout)
    assert proc.stdout.decode() == data["text"] + "\n" and len(data["text"].strip()) > 20
    stats = data["stats"]
    assert stats["finish_reason"] in ("length", "stop")
    assert (stats["generated_tokens"] == 24) == (stats["finish_reason"] == "length")
    line = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("sda: ")]
    assert len(line) == 1 and line[0].startswith(f"sda: {stats['generated_tokens']} tokens, ")
    assert f"finish={stats['finish_reason']}" in line[0] and "a=0.5," in line[0]


def test_generate_json(model_path):
    proc = run_cli("generate", QUERY, "--align", "Answer in fewer than 25 words.", "--seed", "3", "--max-tokens",
                   "16", "--json", "--model", str(model_path), "--streams", "contexts")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["text"] and data["stats"]["mode"] == "sda" and data["stats"]["streams"] == "contexts"
    assert data["stats"]["seed"] == 3 and data["stats"]["fusion_backend"] == "native"


def test_generate_is_reproducible_from_the_cli(model_path):
    args = ("generate", QUERY, "--align", "honesty", "--seed", "9", "--max-tokens", "20", "--json",
            "--model", str(model_path))
    first, second = run_cli(*args), run_cli(*args)
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]


def test_info_json_reports_the_native_hook():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["native"] is True and data["native_path"].endswith(("libsda.so", "libsda.dylib"))
    # Built for the host (SDA_NATIVE): the widest pack this CPU runs.
    flags = hardware.cpu_report().flags
    if platform.machine() in ("x86_64", "AMD64") and flags:  # flags come from /proc/cpuinfo (Linux)
        expected = ("AVX-512 (16 floats)" if "avx512f" in flags else
                    "AVX/AVX2 (8 floats)" if "avx" in flags else "NEON/SSE2 (4 floats)")
        assert data["native_simd"] == expected, (data["native_simd"], flags)
    assert data["llama_cpp_python"] == "0.3.36"
    assert "CPU" in data["llama_cpp_backends"]
    assert data["model_cache"] and data["default_model"] == "smollm2-135m-instruct"


def test_models_list_and_path(model_path):
    proc = run_cli("models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["smollm2-135m-instruct"]["cached"] is True and rows["smollm2-135m-instruct"]["default"]
    assert "gemma-3-270m-base" in rows
    proc = run_cli("models", "path", "smollm2")
    assert proc.returncode == 0 and proc.stdout.decode().strip() == str(model_path)


def test_checksum_mismatch_deletes_the_download_and_fails(tmp_path, model_path):
    from sda_local import models

    raw = json.loads(models.catalogue_path().read_text())
    entry = next(m for m in raw["models"] if m["name"] == "smollm2-135m-instruct")
    entry["sha256"] = "0" * 64
    custom = tmp_path / "catalogue.json"
    custom.write_text(json.dumps(raw))
    cache = tmp_path / "cache"
    proc = run_cli("models", "pull", "smollm2-135m-instruct",
                   env={"SDA_LOCAL_CATALOGUE": str(custom), "SDA_LOCAL_CACHE": str(cache)})
    assert_one_line_error(proc, "checksum mismatch")
    assert not any(p.suffix == ".gguf" or p.name.endswith(".partial") for p in cache.rglob("*"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", ""], "query is empty"),
        (["generate", QUERY, "--align", "helpfulnes"], "unknown preset"),
        (["generate", QUERY, "--align", "helpfulness", "--strength", "nan"], "finite"),
        (["generate", QUERY, "--align", "helpfulness", "--strength", "inf"], "finite"),
        (["generate", QUERY, "--align", "helpfulness", "--strength", "-1"], "strength"),
        (["generate", QUERY, "--model", "/nonexistent/model.gguf"], "model file not found"),
        (["generate", QUERY, "--model", "no-such-model"], "unknown model"),
        (["generate", "word " * 300, "--n-ctx", "64"], "context holds"),
        (["generate"], "missing QUERY"),
        (["models", "pull", "no-such-model"], "unknown model"),
    ],
)
def test_bad_input_one_line_error(args, fragment, model_path):
    if "--model" not in args and args[0] == "generate":
        args = args + ["--model", str(model_path)]
    proc = run_cli(*args)
    err = proc.stderr.decode()
    if proc.returncode == 2 and "Error:" in err:  # click's own usage errors (bad option values)
        assert "Traceback" not in err and fragment in err
        return
    assert_one_line_error(proc, fragment)


def test_non_gguf_and_truncated_model_files(tmp_path, model_path):
    not_gguf = tmp_path / "readme.gguf"
    not_gguf.write_text("not a model")
    truncated = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        truncated.write_bytes(f.read(3_000_000))
    assert_one_line_error(run_cli("generate", QUERY, "--model", str(not_gguf)), "not a GGUF")
    assert_one_line_error(run_cli("generate", QUERY, "--model", str(truncated)), "cannot load model")


def test_non_utf8_query(model_path):
    exe_args = [b"generate", b"caf\xe9 ol\xe9", b"--model", os.fsencode(str(model_path))]
    proc = run_cli(*[os.fsdecode(a) for a in exe_args])
    assert_one_line_error(proc, "not valid UTF-8")


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")


def test_batch_with_bad_lines_and_resume(tmp_path, model_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [
        json.dumps({"id": "a", "query": "Name a fruit.", "instruction": "helpfulness", "seed": 1, "max_tokens": 12}),
        '{"id": "broken", "query": ',  # line 2: malformed JSON
        json.dumps({"id": "b", "query": "Name a colour.", "instruction": None, "seed": 2, "max_tokens": 12}),
        b'{"id": "c", "query": "caf\xe9"}',  # line 4: not UTF-8
        json.dumps({"id": "d"}),  # line 5: no query
        json.dumps({"query": "Name a planet.", "seed": 3, "max_tokens": 12, "temperature_mode": "reference"}),
        json.dumps({"id": "e", "query": "Name a tree.", "strength": "strong"}),  # line 7: bad strength
    ])
    common = ["--model", str(model_path), "--align", "honesty"]
    proc = run_cli("generate", "--input", str(inp), "--output", str(out), *common)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    for fragment in ("line 2: malformed JSON", "line 4: not valid UTF-8", 'line 5: missing or empty "query"',
                     "line 7 (id e): strength must be a finite number"):
        assert fragment in err, err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", "b", 6]
    assert results[0]["stats"]["mode"] == "sda" and results[1]["stats"]["mode"] == "plain"
    assert results[2]["stats"]["temperature_mode"] == "reference"  # --align applies when the line has none

    # Without --resume the results file is protected.
    assert_one_line_error(run_cli("generate", "--input", str(inp), "--output", str(out), *common), "--resume")

    # Simulate a crash mid-write: a partial last line. Resume cuts it off and redoes that id only.
    text = out.read_text().splitlines()
    with open(out, "w") as f:
        f.write("\n".join(text[:2]) + "\n" + text[2][: len(text[2]) // 2])
    proc = run_cli("generate", "--input", str(inp), "--output", str(out), "--resume", *common)
    assert proc.returncode == 1  # the bad lines still fail
    assert "1 generated, 2 already done" in proc.stderr.decode()
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == ["a", "b", 6]
    assert again[2]["text"] == results[2]["text"]  # same seed, same answer
