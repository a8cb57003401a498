"""``sda-local eval``: data sets, verifiable checks, summaries, and real runs with kill-and-resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from fault_server import FaultServer, completion
from sda_local.evaluation.datasets import load_dataset
from sda_local.errors import InputError
from sda_local.evaluation import (EvalConfig, Evaluation, RunFile, judged_units, summarize, summary_markdown,
                                  verify_units)
from sda_local.seeds import MAX_SEED
from sda_local.evaluation.verifiable import VERIFIABLE

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXE = os.path.join(os.path.dirname(sys.executable), "sda-local")


def data(name):
    path = DATA / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"evaluation data not found at {path}")
        pytest.skip(f"evaluation data not found at {path}")
    return path


@pytest.mark.parametrize("name, fmt, dims, first", [
    ("empathetic_dialogues_test.jsonl", "empathetic_dialogues", ("empathy",), "I couldn't believe it"),
    ("dialogsum_test.jsonl", "dialogsum", ("summarization",), "#Person1#"),
    ("beavertails_eval.jsonl", "beavertails", ("helpfulness", "harmlessness"), "What's the most painful"),
    ("harmfulqa.jsonl", "harmfulqa", ("helpfulness", "harmlessness"), "How can I invest"),
    ("truthfulqa.jsonl", "truthfulqa", ("honesty",), "What happens to you if you eat watermelon"),
])
def test_paper_datasets_are_detected(name, fmt, dims, first):
    ds = load_dataset(data(name), limit=3)
    assert ds.format == fmt and ds.dimensions == dims and len(ds.items) == 3
    assert ds.items[0][0] == 0 and ds.items[0][1].startswith(first)


def test_offset_limit_and_seeded_sample():
    path = data("truthfulqa.jsonl")
    assert [i for i, _ in load_dataset(path, offset=10, limit=2).items] == [10, 11]
    a = load_dataset(path, sample=5, seed=3).items
    assert a == load_dataset(path, sample=5, seed=3).items and a != load_dataset(path, sample=5, seed=4).items


def test_user_datasets_and_bad_input(tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text('{"text": "Tell me a joke."}\n{"text": "Describe rain."}\n')
    ds = load_dataset(user, query_field="text", dimensions=["Answer in fewer than 25 words."])
    assert ds.name == "mine" and ds.format is None and [q for _, q in ds.items] == ["Tell me a joke.", "Describe rain."]
    with pytest.raises(InputError, match="unknown dataset format"):
        load_dataset(user)
    with pytest.raises(InputError, match="missing or empty field 'query'"):
        load_dataset(user, query_field="query", dimensions=["honesty"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_dataset(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="line 2"):
        load_dataset(broken, query_field="text", dimensions=["honesty"])


@pytest.mark.parametrize("vid, good, bad", [
    ("no_commas", "Yes it is.", "Yes, it is."),
    ("under_40_words", "Short answer.", "word " * 40),
    ("lowercase", "all lowercase here.", "Not lowercase."),
    ("keyword_banana", "A Banana split.", "An apple."),
    ("end_phrase", "Boil it. Hope this helps!", "Hope this helps! Boil it."),
    ("postscript", "Done.\nP.S. Enjoy.", "Done."),
    ("three_bullets", "* a\n* b\n- c", "* a\n* b"),
])
def test_verifiable_checks(vid, good, bad):
    assert VERIFIABLE[vid].check(good) and not VERIFIABLE[vid].check(bad)


def test_summary_counts_and_omega():
    records = [
        {"type": "pair", "key": "truthfulqa:honesty:0", "arm": "base", "outcome": "win"},
        {"type": "pair", "key": "truthfulqa:honesty:1", "arm": "base", "outcome": "win"},
        {"type": "pair", "key": "truthfulqa:honesty:2", "arm": "base", "outcome": "loss"},
        {"type": "pair", "key": "truthfulqa:honesty:3", "arm": "base", "outcome": "tie"},
        {"type": "pair", "key": "truthfulqa:honesty:4", "arm": "base", "outcome": "failure"},
        {"type": "check", "key": "verify:no_commas:x:0", "arm": "sda", "instruction": "no_commas", "complied": True},
        {"type": "check", "key": "verify:no_commas:x:1", "arm": "sda", "instruction": "no_commas", "complied": False},
    ]
    s = summarize(records)
    cell = s["judged"]["truthfulqa"]["honesty"]["base"]
    assert (cell["wins"], cell["losses"], cell["ties"], cell["failures"]) == (2, 1, 1, 1)
    assert cell["omega"] == pytest.approx(0.25)  # failures are not in the denominator
    assert s["verifiable"]["no_commas"]["sda"] == {"compliance": 0.5, "n": 2}
    md = summary_markdown(s)
    assert "| truthfulqa | honesty | base | +25.0% | 2 | 1 | 1 | 1 | +28.4% |" in md


def eval_args(run, *extra):
    return ["eval", "-d", str(data("truthfulqa.jsonl")), "--limit", "2", "-n", "20", "--verify",
            "no_commas,under_40_words", "--verify-limit", "2", "--run", str(run), "--temperature-mode", "paper", *extra]


def records_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_eval_run_kill_and_resume(tmp_path, model_path):
    run = tmp_path / "run.jsonl"
    proc = subprocess.Popen([EXE, *eval_args(run, "--model", str(model_path))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not run.exists() or len(run.read_text().splitlines()) < 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # killed mid-run
    proc.wait()
    before = records_of(run)
    assert before[0]["type"] == "run" and len(before) >= 6
    with open(run, "a") as f:
        f.write('{"type": "answer", "key": "truthfulqa:hon')  # a crash mid-write leaves a partial line

    resumed = run_cli("eval", "--resume", str(run), "--model", str(model_path), timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    after = records_of(run)
    assert after[: len(before)] == before  # nothing redone, nothing lost
    answers = [(r["key"], r["arm"]) for r in after if r["type"] == "answer"]
    assert len(answers) == len(set(answers)) == 2 * 4 + 2 * 2 * 4
    pairs = [r for r in after if r["type"] == "pair"]
    assert len(pairs) == 2 * 3 and all(r["order_seed"] for r in pairs)
    # The order is the seeded draw, and (with seed 0 on these six pairs) both orders occur.
    assert all(r["sda_first"] == (random.Random(r["order_seed"]).random() < 0.5) for r in pairs)
    assert sorted(r["sda_first"] for r in pairs) == [False, False, True, True, True, True]
    checks = [r for r in after if r["type"] == "check"]
    assert len(checks) == 2 * 2 * 4

    summary = json.loads((tmp_path / "run.summary.json").read_text())
    cell = summary["judged"]["truthfulqa"]["honesty"]
    assert set(cell) == {"base", "prompt-only", "steering-only"}
    for c in cell.values():
        assert c["wins"] + c["losses"] + c["ties"] + c["failures"] == 2
        assert set(c) == {"omega", "wins", "losses", "ties", "failures"}
    assert set(summary["verifiable"]) == {"no_commas", "under_40_words"}
    assert set(summary["verifiable_overall"]) == {"base", "prompt-only", "steering-only", "sda"}
    assert "| truthfulqa | honesty | base |" in (tmp_path / "run.summary.md").read_text()
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| truthfulqa | honesty | base |" in resumed.stdout.decode()

    # Resuming a finished run redoes nothing.
    again = run_cli("eval", "--resume", str(run), "--model", str(model_path), timeout=300)
    assert again.returncode == 0 and records_of(run) == after


@pytest.mark.parametrize("make, args, fragment", [
    (lambda p: p.write_text('{"text": "hi"}\n'), [], "unknown dataset format"),
    (lambda p: p.write_text('{"text": "hi"}\n'), ["--query-field", "query", "--dimension", "honesty"], "missing or empty"),
    (lambda p: p.write_text(""), [], "is empty"),
])
def test_eval_bad_data(tmp_path, make, args, fragment):
    path = tmp_path / "d.jsonl"
    make(path)
    proc = run_cli("eval", "-d", str(path), "--run", str(tmp_path / "r.jsonl"), *args)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and fragment in err.strip().splitlines()[-1]
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_unreadable_run_file(tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text("hello\n")
    proc = run_cli("eval", "--resume", str(bad))
    assert proc.returncode == 1 and "not a sda-local eval run file" in proc.stderr.decode()
    proc = run_cli("eval", "--resume", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 1 and "cannot read run file" in proc.stderr.decode()
    proc = run_cli("eval", "-d", str(data("truthfulqa.jsonl")), "--arms", "base,magic")
    assert proc.returncode == 1 and "unknown arm" in proc.stderr.decode()


# -- bookkeeping: retries, keys, seeds -------------------------------------------------------------------------
# One reply that parses both as a score ({"score"}) and as a pairwise judgement ({"score_a", "score_b"}).
BOTH = completion(json.dumps({"score": 80, "score_a": 70, "score_b": 40}))


def user_file(path, *queries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"q": q}) + "\n" for q in queries))
    return path


def test_summary_counts_each_unit_once_and_reads_dimensions_from_fields():
    dim = "Be brief: one line."
    records = [
        {"type": "pair", "key": "mine#1a2b3c4d:Be brief: one line.:0", "arm": "base", "dataset": "mine",
         "dimension": dim, "outcome": "failure"},
        {"type": "pair", "key": "mine#1a2b3c4d:Be brief: one line.:1", "arm": "base", "dataset": "mine",
         "dimension": dim, "outcome": "loss"},
        {"type": "pair", "key": "mine#1a2b3c4d:Be brief: one line.:0", "arm": "base", "dataset": "mine",
         "dimension": dim, "outcome": "win"},  # the retry of the failure above: it replaces it
        {"type": "pair", "key": "old:Be brief: one line.:2", "arm": "base", "outcome": "tie"},  # a version 1 record
        {"type": "check", "key": "verify:no_commas:x:0", "arm": "sda", "instruction": "no_commas", "complied": False},
        {"type": "check", "key": "verify:no_commas:x:0", "arm": "sda", "instruction": "no_commas", "complied": True},
    ]
    s = summarize(records)
    cell = s["judged"]["mine"][dim]["base"]
    assert (cell["wins"], cell["losses"], cell["ties"], cell["failures"]) == (1, 1, 0, 0)
    assert s["judged"]["old"][dim]["base"]["ties"] == 1
    assert s["verifiable"]["no_commas"]["sda"] == {"compliance": 1.0, "n": 1}


def test_eval_seeds_wrap_past_the_random_seed(tmp_path):
    data = user_file(tmp_path / "d.jsonl", "one", "two", "three")
    config = EvalConfig(datasets=[{"path": str(data), "query_field": "q", "dimensions": ["honesty"]}],
                        arms=["base", "sda"], seed=MAX_SEED - 1, verify=["no_commas"])
    config.check()
    assert [u.seed for u in judged_units(config)] == [MAX_SEED - 1, MAX_SEED, 0]  # never 4294967295
    assert [u[2] for u in verify_units(config)] == [MAX_SEED - 1, MAX_SEED, 0]
    config.seed = MAX_SEED + 1
    with pytest.raises(InputError, match="0..4294967294"):
        config.check()


def test_same_stem_files_get_their_own_units(tmp_path):
    a = user_file(tmp_path / "a" / "data.jsonl", "Name a fruit.")
    b = user_file(tmp_path / "b" / "data.jsonl", "Name a colour.")
    config = EvalConfig(datasets=[{"path": str(p), "query_field": "q", "dimensions": ["honesty"]} for p in (a, b, a)])
    units = judged_units(config)  # the same file twice counts once
    assert [u.query for u in units] == ["Name a fruit.", "Name a colour."]
    assert len({u.key for u in units}) == 2 and [u.dataset for u in units] == [str(a), str(b)]


def test_version_1_run_files_resume_with_their_own_keys(tmp_path):
    data = user_file(tmp_path / "d.jsonl", "Name a fruit.")
    config = EvalConfig(datasets=[{"path": str(data), "query_field": "q", "dimensions": ["honesty"]}],
                        arms=["base", "sda"])
    records = [
        {"type": "run", "version": 1, "config": config.__dict__},
        {"type": "answer", "key": "d:honesty:0", "arm": "base", "text": "Apple.", "stats": {"strength": None}},
        {"type": "score", "key": "d:honesty:0", "score": 40, "amplifier": 0.3},
        {"type": "answer", "key": "d:honesty:0", "arm": "sda", "text": "An apple.", "stats": {"strength": 0.3}},
        {"type": "pair", "key": "d:honesty:0", "arm": "base", "order_seed": "0:d:honesty:0:base", "sda_first": True,
         "outcome": "win"},
    ]
    path = tmp_path / "v1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = RunFile(path)
    try:
        Evaluation(None, None, run).execute()  # complete: neither the engine nor the judge is needed
    finally:
        run.close()
    assert records_of(path) == records
    assert summarize(run.records)["judged"]["d"]["honesty"]["base"]["wins"] == 1
    path.write_text(json.dumps({"type": "run", "version": 99, "config": {}}) + "\n")
    with pytest.raises(InputError, match="another sda-local version"):
        RunFile(path)


def test_eval_arms_sda_alone_is_refused_before_the_model_loads(tmp_path):
    data = user_file(tmp_path / "d.jsonl", "Name a fruit.")
    for extra in ([], ["--verify", "no_commas"]):
        proc = run_cli("eval", "-d", str(data), "--query-field", "q", "--dimension", "honesty", "--arms", "sda",
                       *extra, "--run", str(tmp_path / "r.jsonl"), "--model", str(tmp_path / "missing.gguf"))
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.strip().splitlines() == [
            "error: --arms sda alone leaves nothing to compare SDA with: add base, prompt-only and/or steering-only"]
        assert not (tmp_path / "r.jsonl").exists()


def fault_eval(server, model_path, *args):
    return run_cli("eval", *args, "--judge", "openai:fault", "--judge-url", server.url, "--model", str(model_path))


def test_eval_unit_seeds_reproduce_at_the_wrap(tmp_path, model_path):
    data = user_file(tmp_path / "d.jsonl", "Write one sentence about the sea.", "Write one sentence about a forest.")
    answers = []
    with FaultServer([("json", BOTH)]) as server:
        for name in ("r1", "r2"):
            run = tmp_path / f"{name}.jsonl"
            proc = fault_eval(server, model_path, "-d", str(data), "--query-field", "q", "--dimension", "honesty",
                              "--arms", "base", "--seed", str(MAX_SEED), "-n", "16", "--run", str(run))
            assert proc.returncode == 0, proc.stderr
            answers.append({(r["key"], r["arm"]): r for r in records_of(run) if r["type"] == "answer"})
    assert len(answers[0]) == 4 and answers[0].keys() == answers[1].keys()
    assert sorted({r["stats"]["seed"] for r in answers[0].values()}) == [0, MAX_SEED]  # item 1 wrapped to 0
    for unit, r in answers[0].items():
        assert r["text"] == answers[1][unit]["text"], unit


def test_eval_resume_retries_failed_judgements_and_keeps_files_apart(tmp_path, model_path):
    dimension = "Answer in one line: no lists."  # a custom dimension with a ":"
    files = [user_file(tmp_path / "a" / "data.jsonl", "Name a fruit."),
             user_file(tmp_path / "b" / "data.jsonl", "Name a colour.")]  # the same file name twice
    run = tmp_path / "run.jsonl"
    with FaultServer([("score", 0)]) as server:  # out of range: every judgement fails
        proc = fault_eval(server, model_path, "-d", str(files[0]), "-d", str(files[1]), "--query-field", "q",
                          "--dimension", dimension, "--arms", "base", "-n", "12", "--run", str(run))
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.decode().count("--resume retries it") == 4  # two scores, two pairs
        first = records_of(run)
        scores = [r for r in first if r["type"] == "score"]
        assert len(scores) == 2 and all(r["score"] is None for r in scores)
        keys = [r["key"] for r in scores]
        assert len(set(keys)) == 2  # two files, two units: they share no answers
        asked = json.dumps([r["json"] for r in server.requests])
        assert "Name a fruit." in asked and "Name a colour." in asked

        server.script = [("json", BOTH)]  # the judge recovers
        sent_before = len(server.requests)
        proc = run_cli("eval", "--resume", str(run), "--model", str(model_path))
        assert proc.returncode == 0, proc.stderr
        after = records_of(run)
        assert after[: len(first)] == first  # the failed attempts stay in the file
        new = after[len(first):]
        assert sorted(r["type"] for r in new) == ["answer", "answer", "pair", "pair", "score", "score"]
        pair_requests = [r["json"]["messages"][1]["content"] for r in server.requests[sent_before:]
                         if "<answer_b>" in r["json"]["messages"][1]["content"]]
        for key, request in zip(keys, pair_requests):
            score = next(r for r in new if r["type"] == "score" and r["key"] == key)
            sda = next(r for r in new if r["type"] == "answer" and r["key"] == key)
            pair = next(r for r in new if r["type"] == "pair" and r["key"] == key)
            base = next(r for r in first if r["type"] == "answer" and r["key"] == key and r["arm"] == "base")
            assert score["score"] == 80 and score["amplifier"] != 0.5
            # The SDA answer made with the failure's a = 0.5 is regenerated with the judged a.
            assert sda["arm"] == "sda" and sda["stats"]["strength"] == score["amplifier"]
            assert pair["dimension"] == dimension and pair["arm"] == "base"
            assert pair["sda_first"] == (random.Random(pair["order_seed"]).random() < 0.5)
            assert pair["outcome"] == ("win" if pair["sda_first"] else "loss")  # the judge said A 70, B 40
            if sda["text"] != base["text"]:
                assert (sda["text"] in request.split("<answer_b>")[0]) == pair["sda_first"]

        summary = json.loads((tmp_path / "run.summary.json").read_text())
        assert sorted(summary["judged"]) == sorted(str(f.resolve()) for f in files)  # same name: told apart by path
        for dims in summary["judged"].values():
            assert list(dims) == [dimension]
            cell = dims[dimension]["base"]
            assert cell["failures"] == 0 and cell["wins"] + cell["losses"] == 1  # each unit once

        # All judged: resuming again asks the judge nothing and adds nothing.
        sent = len(server.requests)
        again = run_cli("eval", "--resume", str(run), "--model", str(model_path))
        assert again.returncode == 0 and len(server.requests) == sent and records_of(run) == after


def test_parallel_eval_units_get_the_answers_they_get_alone(tmp_path, model_path):
    data = user_file(tmp_path / "d.jsonl", "Write one sentence about the sea.", "Name three fruits.",
                     "How do I boil an egg?")
    answers = []
    for parallel in ("1", "3"):
        run = tmp_path / f"r{parallel}.jsonl"
        proc = run_cli("eval", "-d", str(data), "--query-field", "q", "--dimension", "honesty", "--verify",
                       "no_commas,lowercase", "--verify-only", "--verify-strength", "judge", "--verify-limit", "3",
                       "-n", "12", "--model", str(model_path), "--run", str(run), "--parallel", parallel)
        assert proc.returncode == 0, proc.stderr.decode()
        answers.append({(r["key"], r["arm"]): r["text"] for r in records_of(run) if r["type"] == "answer"})
    assert len(answers[0]) >= 6 * 4 and answers[0] == answers[1]  # 3 queries x 2 instructions x arms


def test_eval_ifeval_on_the_dev_set_reports_quality_per_arm(tmp_path, model_path):
    # The whole verifiable path as the README runs it, on two IFEval types and two dev questions: every check
    # carries compliance, the echo and degeneration flags, the fluency, and the IFEval arguments it was made with.
    pytest.importorskip("if_verifiable")
    run = tmp_path / "ifeval.jsonl"
    proc = run_cli("eval", "-d", "dev", "--verify", "ifeval:punctuation:no_comma,ifeval:startend:end_checker",
                   "--verify-only", "--arms", "prompt-only,paper", "--verify-limit", "2", "-n", "16",
                   "--model", str(model_path), "--run", str(run), "--parallel", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    checks = [r for r in records_of(run) if r["type"] == "check"]
    assert sorted({c["arm"] for c in checks}) == ["paper", "prompt-only", "sda"] and len(checks) == 2 * 2 * 3
    for c in checks:
        assert isinstance(c["complied"], bool) and isinstance(c["echo"], bool) and isinstance(c["degenerate"], bool)
        assert c["fluency"] is None or c["fluency"] < 0
        assert c["instruction_text"] and isinstance(c["kwargs"], dict)
    answers = {(r["key"], r["arm"]): r for r in records_of(run) if r["type"] == "answer"}
    assert {a["stats"]["steering"]["mode"] for (k, arm), a in answers.items() if arm == "paper"} == {"paper"}
    assert {a["stats"]["steering"]["mode"] for (k, arm), a in answers.items() if arm == "sda"} == {"guarded"}
    summary = json.loads(run.with_suffix(".summary.json").read_text())
    cell = summary["verifiable_overall"]["sda"]
    assert cell["n"] == 4 and {"echo", "echo_share", "degenerate", "fluency", "clean"} <= set(cell)
    from sda_local.evaluation.quality import clean

    sda_checks = [c for c in checks if c["arm"] == "sda"]
    assert cell["clean"] == sum(clean(c["complied"], c["echo"], c["degenerate"], c["fluency"])
                                for c in sda_checks) / len(sda_checks)
    assert "Quality per arm" in proc.stdout.decode() and "clean compliance" in proc.stdout.decode()


def test_eval_refuses_unknown_ifeval_types_and_paper_outside_verify(tmp_path):
    proc = run_cli("eval", "-d", "dev", "--verify", "ifeval:nope", "--verify-only", "--run", str(tmp_path / "r.jsonl"))
    assert proc.returncode != 0 and b"ifeval:TYPE" in proc.stderr and b"Traceback" not in proc.stderr
    proc = run_cli("eval", "-d", "dev", "--arms", "paper,base", "--run", str(tmp_path / "s.jsonl"))
    assert proc.returncode != 0 and b"--verify-only" in proc.stderr


def test_a_run_keeps_its_kv_cache_settings(tmp_path, model_path):
    run = tmp_path / "run.jsonl"
    args = ["eval", "-d", str(data("truthfulqa.jsonl")), "--verify-only", "--verify", "no_commas", "--verify-limit",
            "1", "--verify-strength", "0.5", "--limit", "1", "-n", "8", "--run", str(run), "--model", str(model_path)]
    first = run_cli(*args, "-ctk", "q8_0", "-ctv", "q8_0", timeout=300)
    assert first.returncode == 0, first.stderr.decode()
    assert records_of(run)[0]["config"]["kv_cache"] == {"cache_type_k": "q8_0", "cache_type_v": "q8_0",
                                                        "flash_attn": "auto"}
    resume = ["eval", "--resume", str(run), "--model", str(model_path)]
    refused = run_cli(*resume, "-ctk", "f16", timeout=300)
    err = refused.stderr.decode()
    assert refused.returncode != 0 and "Traceback" not in err
    assert "this run was made with --cache-type-k q8_0: --resume keeps a run's KV cache settings" in err
    assert run_cli(*resume, timeout=300).returncode == 0  # the recorded settings, without asking again
