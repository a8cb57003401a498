"""NaN and +inf logits (fp16 overflow on GPU builds) never become a sampled token; -inf (a masked token) is legal.

The fusion level needs no model. Generation reaches the fault path with the real model through the test-only
SDA_LOCAL_TEST_INJECT_LOGITS, which overwrites one logit of the chosen row at the chosen step, inside the
native samplers and the numpy paths, before their checks.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

from conftest import run_cli
from fault_server import FaultServer, completion
from sda_local import ModelError, SDAEngine, fuse
from sda_local.engine import native
from sda_local.engine.fusion import TEST_INJECTION_ENV, NonFiniteLogitsError

QUERY = "How do I fix a flat bike tyre?"
BAD = {"NaN": np.float32("nan"), "+inf": np.float32("inf")}
ROWS = {"with": "with-instruction", "without": "without-instruction"}


def stopped(value, step, row=None):
    where = f"of the {ROWS[row]} stream" if row else "(plain generation)"
    return f"the model produced non-finite logits ({value}) at step {step} {where}; generation stopped"


# -- the fusion itself ----------------------------------------------------------------------------------------
def rows(n=4099, seed=0):  # 4099: both the 8-lane body and the scalar tail of the max pass are exercised
    rng = np.random.default_rng(seed)
    z_with = rng.normal(0, 3, n).astype(np.float32)
    return z_with, (z_with + rng.normal(0, 0.7, n)).astype(np.float32)


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("row", ["with", "without"])
@pytest.mark.parametrize("value", ["NaN", "+inf"])
@pytest.mark.parametrize("position", [0, 2051, 4098])
def test_fuse_refuses_a_non_finite_row(backend, row, value, position):
    pair = list(rows())
    pair[row == "without"][position] = BAD[value]
    with pytest.raises(ModelError) as info:
        fuse(*pair, 0.5, backend=backend)
    assert isinstance(info.value, NonFiniteLogitsError) and (info.value.value, info.value.row) == (value, row)
    assert str(info.value) == f"non-finite logits ({value}) in the {ROWS[row]} row"


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_negative_infinity_is_legal_nan_of_either_sign_and_both_faults_are_not(backend):
    z_with, z_without = rows()
    z_with[:5] = z_without[5:10] = -np.inf  # masked tokens: fused as before, no fault
    z_without[::2] = -np.inf
    log_probs, _, _ = fuse(z_with, z_without, 0.5, backend=backend)
    assert np.isneginf(log_probs[:5]).all() and not np.isnan(log_probs).any()
    masked = np.full(16, -np.inf, dtype=np.float32)
    fuse(masked, masked, 0.5, backend=backend)  # nothing can be sampled, but nothing is wrong either
    z_without[7] = -np.float32("nan")  # sign bit set: still a NaN
    with pytest.raises(NonFiniteLogitsError, match=r"\(NaN\) in the without-instruction row"):
        fuse(z_with, z_without, 0.5, backend=backend)
    z_with[3], z_with[9] = np.inf, np.nan  # NaN is reported before +inf
    with pytest.raises(NonFiniteLogitsError, match=r"\(NaN\) in the with-instruction row"):
        fuse(z_with, z_without, 0.5, backend=backend)


def test_sda_fuse_returns_a_distinct_code_per_row_and_value():
    lib = native.library()
    assert lib is not None, native.load_error()
    params = native.make_params(0.5, 2.0, 0.6, 0)
    fp = ctypes.POINTER(ctypes.c_float)
    codes = {}
    for row in ("with", "without"):
        for value in ("NaN", "+inf"):
            pair = list(rows(n=64))
            pair[row == "without"][10] = BAD[value]
            out = np.empty(64, dtype=np.float32)
            codes[(value, row)] = lib.sda_fuse(pair[0].ctypes.data_as(fp), pair[1].ctypes.data_as(fp), 64,
                                               ctypes.byref(params), out.ctypes.data_as(fp), None, None)
    assert codes == {("NaN", "with"): -2, ("+inf", "with"): -3, ("NaN", "without"): -4, ("+inf", "without"): -5}
    ok = rows(n=64)
    ok[0][:3] = ok[1][2:6] = -np.inf  # legal
    out = np.empty(64, dtype=np.float32)
    assert lib.sda_fuse(ok[0].ctypes.data_as(fp), ok[1].ctypes.data_as(fp), 64, ctypes.byref(params),
                        out.ctypes.data_as(fp), None, None) == 0


# -- generation with the real model ---------------------------------------------------------------------------
# One engine per fusion backend and stream mode; the cases are told apart by seed.
CASES = {  # seed: (steered, value, step, row)
    101: (True, "NaN", 3, "with"),
    102: (True, "+inf", 2, "with"),
    103: (True, "NaN", 1, "without"),
    104: (True, "+inf", 4, "without"),
    105: (False, "NaN", 3, None),
    106: (False, "+inf", 1, None),
}
INJECT = ",".join(
    f"{'nan' if value == 'NaN' else '+inf'}@{step}:{row or 'with'}:seed={seed}"
    for seed, (_, value, step, row) in CASES.items()
) + ",-inf@2:seed=107,-inf@2:without:seed=108"


@pytest.fixture(scope="module", params=[("native", "batched"), ("native", "contexts"), ("numpy", "batched"),
                                        ("numpy", "contexts")], ids=lambda p: "-".join(p))
def injected(request, model_path):
    backend, streams = request.param
    eng = SDAEngine(str(model_path), n_ctx=512, n_threads=1, streams=streams, fusion_backend=backend)
    with pytest.MonkeyPatch.context() as mp:  # the engine reads the variable at its first generation
        mp.setenv(TEST_INJECTION_ENV, INJECT)
        eng.generate(QUERY, None, seed=1, max_tokens=1)
    assert eng.fusion_backend == backend
    yield eng
    eng.close()


@pytest.mark.parametrize("seed", sorted(CASES))
def test_generation_stops_with_a_one_line_error(injected, seed):
    steered, value, step, row = CASES[seed]
    stream = injected.stream(QUERY, "helpfulness" if steered else None, strength=0.5, seed=seed, max_tokens=16,
                             ignore_eos=True)
    pieces = []
    with pytest.raises(ModelError) as info:
        for piece in stream:
            pieces.append(piece)
    assert str(info.value) == stopped(value, step, row)
    assert stream.result is None
    if step == 1:
        assert pieces == []


def test_text_before_the_fault_is_what_a_clean_run_gives(injected, engine):
    # Seed 101 is injected at step 3: the two tokens before it are sampled as in a run without injection
    # (``engine``, the session's engine, never saw the variable; backends and stream modes sample alike).
    pieces = []
    with pytest.raises(ModelError, match="at step 3 "):
        for piece in injected.stream(QUERY, "helpfulness", strength=0.5, seed=101, max_tokens=16, ignore_eos=True):
            pieces.append(piece)
    reference = engine.generate(QUERY, "helpfulness", strength=0.5, seed=101, max_tokens=2, ignore_eos=True)
    assert pieces and reference.text.startswith("".join(pieces))


def test_engine_keeps_working_after_a_fault_and_negative_infinity_is_no_fault(injected):
    with pytest.raises(ModelError):
        injected.generate(QUERY, "helpfulness", strength=0.5, seed=103, max_tokens=8)
    a = injected.generate(QUERY, "helpfulness", strength=0.5, seed=5, max_tokens=12, ignore_eos=True)
    b = injected.generate(QUERY, "helpfulness", strength=0.5, seed=5, max_tokens=12, ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    # Seeds 107 and 108 get a -inf (a masked token) in the with- and without-row at step 2: no fault.
    for seed, instruction in ((107, "helpfulness"), (107, None), (108, "helpfulness")):
        result = injected.generate(QUERY, instruction, strength=0.5, seed=seed, max_tokens=8, ignore_eos=True)
        assert result.stats.generated_tokens == 8


# -- the command line ------------------------------------------------------------------------------------------
def one_line_error(proc, message):
    err = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {message}"], err


@pytest.mark.parametrize("streams", ["batched", "contexts"])
def test_cli_generate_json_fails_with_one_line(model_path, streams):
    steered = run_cli("generate", QUERY, "--align", "helpfulness", "--strength", "0.5", "--seed", "3", "--json",
                      "--max-tokens", "12", "--model", str(model_path), "--threads", "1", "--streams", streams,
                      env={TEST_INJECTION_ENV: "+inf@2:without"})
    one_line_error(steered, stopped("+inf", 2, "without"))
    assert steered.stdout == b""  # no JSON for an answer that does not exist
    plain = run_cli("generate", QUERY, "--seed", "3", "--json", "--max-tokens", "12", "--model", str(model_path),
                    "--threads", "1", "--streams", streams, env={TEST_INJECTION_ENV: "nan@4"})
    one_line_error(plain, stopped("NaN", 4))


def test_cli_bad_injection_setting_is_a_one_line_error(model_path):
    proc = run_cli("generate", QUERY, "--seed", "3", "--max-tokens", "4", "--model", str(model_path),
                   "--threads", "1", env={TEST_INJECTION_ENV: "nan@zero"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and f"error: {TEST_INJECTION_ENV}: bad entry" in err


def test_batch_records_the_line_as_failed_and_goes_on(tmp_path, model_path):
    lines = [
        {"id": "a", "query": "Name a fruit.", "instruction": "helpfulness", "strength": 0.5, "seed": 201},
        {"id": "b", "query": "Name a colour.", "instruction": "helpfulness", "strength": 0.5, "seed": 202},
        {"id": "c", "query": "Name a river.", "instruction": None, "seed": 203},
        {"id": "d", "query": "Name a tree.", "instruction": None, "seed": 204},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--input", str(source), "--output", str(out), "--max-tokens", "8",
                   "--model", str(model_path), "--threads", "1",
                   env={TEST_INJECTION_ENV: "nan@2:without:seed=202,+inf@1:seed=203"})
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert proc.returncode == 1, err  # a batch with failed lines exits 1, after the last line
    assert f"line 2 (id b): {stopped('NaN', 2, 'without')}" in err.splitlines()
    assert f"line 3 (id c): {stopped('+inf', 1)}" in err.splitlines()
    assert "2 generated, 0 already done, 2 failed (of 4 lines)" in err
    done = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in done] == ["a", "d"] and all(r["text"] for r in done)


# -- the local judge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("judge, message", [
    (["--judge", "local", "--judge-scoring", "greedy"], "local judge: " + stopped("NaN", 2)),
    (["--judge", "local"], "local judge: the model produced non-finite logits (NaN) while judging"),
    (["--judge", "self"], "self judge: the model produced non-finite logits (NaN) while judging"),
])
def test_the_local_judges_refuse_non_finite_logits(model_path, judge, message):
    """Greedy decoding, expected scoring and the self judge check their rows too: a judgement never rests on a
    NaN row."""
    args = ["judge", QUERY, "Check the tyre, find the hole, patch it.", "--align", "helpfulness", "--json",
            "--model", str(model_path), "--threads", "1", *judge]
    one_line_error(run_cli(*args, env={TEST_INJECTION_ENV: "nan@2"}), message)
    clean = run_cli(*args, env={TEST_INJECTION_ENV: "-inf@2"})
    assert clean.returncode == 0 and json.loads(clean.stdout)["judge"].startswith(judge[1]), clean.stderr


# -- the evaluation --------------------------------------------------------------------------------------------
def test_eval_unit_with_a_fault_is_recorded_as_failed_and_the_run_goes_on(tmp_path, model_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": q}) + "\n" for q in ("Name a fruit.", "Name a colour.", "Name a tree.")))
    run = tmp_path / "run.jsonl"
    judge = completion(json.dumps({"score": 80, "score_a": 70, "score_b": 40}))
    with FaultServer([("json", judge)]) as server:
        args = ["-d", str(data), "--query-field", "q", "--dimension", "honesty", "--arms", "base", "--seed", "300",
                "-n", "8", "--judge", "openai:fault", "--judge-url", server.url, "--model", str(model_path),
                "--threads", "1"]
        # Unit 2 (seed 301) meets a NaN in its first answer (base, plain generation).
        proc = run_cli("eval", *args, "--run", str(run), env={TEST_INJECTION_ENV: "nan@2:seed=301"})
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err, err  # the summary is written, work is left
        assert stopped("NaN", 2) in err and f"1 unit(s) failed; --resume {run} retries them" in err
        records = [json.loads(line) for line in run.read_text().splitlines()]
        failures = [r for r in records if r.get("type") == "unit_failure"]
        assert len(failures) == 1 and failures[0]["error"] == stopped("NaN", 2)
        failed_key = failures[0]["key"]
        answers = [r for r in records if r.get("type") == "answer"]
        assert {r["stats"]["seed"] for r in answers} == {300, 302}  # the units before and after it ran
        assert failed_key not in {r["key"] for r in answers}
        pairs = [r for r in records if r.get("type") == "pair"]
        assert len(pairs) == 2 and failed_key not in {r["key"] for r in pairs}

        # Without the fault, --resume completes the failed unit only.
        proc = run_cli("eval", "--resume", str(run), "--model", str(model_path), "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        new = [json.loads(line) for line in run.read_text().splitlines()][len(records):]
        assert {r["key"] for r in new} == {failed_key}
        assert {r["type"] for r in new} >= {"answer", "pair"}
