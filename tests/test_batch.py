"""Batch ids (duplicates, null) and reproducible seeds (CLI, API, batch lines), with the real CLI and model.

llama.cpp reads seed 0xFFFFFFFF as "random": it must be refused everywhere, and derived seeds must skip it.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from sda_local.pipeline import align
from sda_local.errors import InputError
from sda_local.seeds import MAX_SEED, check_seed, derive_seed

RANDOM_SEED = 2**32 - 1  # LLAMA_DEFAULT_SEED
QUERY = "Write one sentence about the sea."
RANGE = "must be an integer in 0..4294967294"


def write_jobs(path, jobs):
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")


def results(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def batch(inp, out, model_path, *extra):
    return run_cli("generate", "--input", str(inp), "--output", str(out), "--model", str(model_path), *extra)


def test_duplicate_and_null_ids_fail_with_both_line_numbers(tmp_path, model_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jobs(inp, [
        {"id": "a", "query": "Name a fruit.", "seed": 1, "max_tokens": 4},
        {"id": None, "query": "Name a colour.", "seed": 1, "max_tokens": 4},
        {"id": "a", "query": "Name a tree.", "seed": 1, "max_tokens": 4},
        {"query": "Name a planet.", "seed": 2, "max_tokens": 4},  # no id: the line number, 4
        {"id": 4, "query": "Name a river.", "seed": 1, "max_tokens": 4},
    ])
    proc = batch(inp, out, model_path)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert 'line 2: "id" is null' in err
    assert "line 3: duplicate id a (also on line 1)" in err
    assert "line 5: duplicate id 4 (also on line 4)" in err
    assert "2 generated, 0 already done, 3 failed (of 5 lines)" in err
    first = results(out)
    assert [r["id"] for r in first] == ["a", 4]

    # Resume skips the ids already done, and still reports the duplicates instead of taking them as done.
    proc = batch(inp, out, model_path, "--resume")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "line 3: duplicate id a (also on line 1)" in err and "line 5: duplicate id 4 (also on line 4)" in err
    assert "0 generated, 2 already done, 3 failed (of 5 lines)" in err
    assert results(out) == first


def test_batch_line_seeds_reproduce_and_the_random_seed_is_refused(tmp_path, model_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"query": QUERY, "instruction": "honesty", "strength": 0.5, "max_tokens": 16}
    write_jobs(inp, [
        {"id": "x", **line, "seed": MAX_SEED},
        {"id": "y", **line, "seed": MAX_SEED},
        {"id": "z", **line, "seed": RANDOM_SEED},
        {"id": "w", **line, "seed": -1},
    ])
    proc = batch(inp, out, model_path)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"line 3 (id z): seed {RANGE}" in err and f"line 4 (id w): seed {RANGE}" in err
    x, y = results(out)
    assert (x["id"], y["id"]) == ("x", "y") and x["stats"]["seed"] == MAX_SEED
    assert x["text"] == y["text"]


@pytest.mark.parametrize("command", [["generate", QUERY], ["chat"], ["eval", "-d", "data.jsonl"]])
@pytest.mark.parametrize("seed", [str(RANDOM_SEED), "-1", str(2**40)])
def test_cli_refuses_seeds_that_do_not_reproduce_before_loading_the_model(tmp_path, command, seed):
    # The model does not exist: an error about the seed proves the seed was checked first.
    proc = run_cli(*command, f"--seed={seed}", "--model", str(tmp_path / "missing.gguf"), input_bytes=b"")
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert lines == [f"error: --seed {RANGE}" + (" (4294967295 means 'random' to llama.cpp)"
                                                 if seed == str(RANDOM_SEED) else "") + f", got {seed}"], err


def test_cli_highest_seed_reproduces(model_path):
    args = ("generate", QUERY, "--align", "honesty", "--strength", "0.5", "--seed", str(MAX_SEED), "--max-tokens",
            "16", "--json", "--model", str(model_path))
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["stats"]["seed"] == MAX_SEED and a["text"] == b["text"]
    refused = run_cli(*args[:7], str(RANDOM_SEED), *args[8:])
    assert refused.returncode == 1 and f"--seed {RANGE}" in refused.stderr.decode()


def test_api_seeds(engine):
    for bad in (RANDOM_SEED, -1, 2**40, True, 1.0, "1"):
        with pytest.raises(InputError, match=r"seed must be an integer in 0\.\.4294967294"):
            engine.generate(QUERY, seed=bad, max_tokens=4)
    with pytest.raises(InputError, match="'random' to llama.cpp"):
        align(engine, QUERY, "honesty", strength=0.5, seed=RANDOM_SEED, max_tokens=4)
    first = engine.generate(QUERY, "honesty", strength=0.5, seed=MAX_SEED, max_tokens=16)
    second = engine.generate(QUERY, "honesty", strength=0.5, seed=MAX_SEED, max_tokens=16)
    assert first.stats.seed == MAX_SEED and first.text == second.text


def test_derived_seeds_never_hit_the_random_seed():
    assert MAX_SEED == RANDOM_SEED - 1
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED
    for bad in (RANDOM_SEED, -1, True, 2.0, None):
        with pytest.raises(InputError):
            check_seed(bad)
    assert derive_seed(MAX_SEED, 0) == MAX_SEED
    assert derive_seed(MAX_SEED, 1) == 0  # seed + 1 would be 0xFFFFFFFF
    assert derive_seed(MAX_SEED - 1, 3) == 1
    assert derive_seed(7, 5) == 12
    assert all(0 <= derive_seed(MAX_SEED - 10, n) <= MAX_SEED for n in range(40))


def test_parallel_batch_gives_each_line_its_result_alone_in_input_order(tmp_path, model_path, rows_batch_invariant):
    jobs = [{"id": f"q{i}", "query": q, "seed": i, "max_tokens": 12, **extra} for i, (q, extra) in enumerate([
        ("Name a fruit.", {"instruction": None}),
        ("How do I boil an egg?", {"strength": 0.5}),
        ("Why is the sky blue?", {}),  # the full pipeline: first answer, self judge, SDA
        ("Write one sentence about the sea.", {"instruction": "Answer in fewer than 10 words.", "strength": 1.0}),
        ("Name three colours.", {"instruction": None}),
        ("Describe a cat.", {}),
    ])]
    inp = tmp_path / "in.jsonl"
    write_jobs(inp, jobs)
    outputs = {}
    for parallel in ("1", "3"):
        out = tmp_path / f"out{parallel}.jsonl"
        proc = batch(inp, out, model_path, "--align", "honesty", "--parallel", parallel)
        assert proc.returncode == 0, proc.stderr.decode()
        outputs[parallel] = results(out)
    assert [r["id"] for r in outputs["3"]] == [j["id"] for j in jobs]
    assert all(r.get("text") for r in outputs["3"])
    differing = [one["id"] for one, three in zip(outputs["1"], outputs["3"])
                 if one["text"] != three["text"] or one.get("amplifier") != three.get("amplifier")]
    if differing and not rows_batch_invariant:  # the promise's premise fails on this CPU (conftest probes it)
        pytest.skip(f"this CPU's llama.cpp kernels round a row differently beside others; lines {differing} differ")
    assert not differing, [(one, three) for one, three in zip(outputs["1"], outputs["3"]) if one["id"] in differing]
