"""``sda-local eval``: data sets, verifiable checks, summaries, and real runs with kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from sda_local.datasets import load_dataset
from sda_local.errors import InputError
from sda_local.evaluation import summarize, summary_markdown
from sda_local.verifiable import VERIFIABLE

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
            "no_commas,under_40_words", "--verify-limit", "2", "--run", str(run), *extra]


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
    assert {r["sda_first"] for r in pairs} <= {True, False}
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
