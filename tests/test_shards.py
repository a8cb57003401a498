"""--shard I/N and `sda-local merge`: shards run separately (as a job runner would start them), then merged,
give what one run gives."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from sda_local.errors import InputError
from sda_local.shards import Shard, parse_shard


def test_every_key_is_in_exactly_one_shard():
    keys = [f"verify:no_commas:dev#1234abcd:{i}" for i in range(200)]
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if Shard(i, n).holds(k)] for k in keys]
        assert all(len(o) == 1 for o in owners)
        if n > 1:
            assert len({o[0] for o in owners}) == n  # every shard gets some of 200 keys
    assert parse_shard("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def _ok(out):
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return out


def test_batch_shards_merge_to_the_whole_run(model_path, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [{"id": f"q{i}", "query": q, "seed": i, "max_tokens": 6}
             for i, q in enumerate(["Name a colour.", "Name a fruit.", "Say hi.", "Name a tree.", "Count to 3.",
                                    "Name a bird."])]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ("generate", "--input", str(inp), "-m", str(model_path))
    _ok(run_cli(*common, "--output", str(tmp_path / "whole.jsonl")))
    for i in range(2):
        out = _ok(run_cli(*common, "--output", str(tmp_path / f"part{i}.jsonl"), "--shard", f"{i}/2"))
        assert b"left to other shards" in out.stderr
    parts = [(tmp_path / f"part{i}.jsonl").read_text().splitlines() for i in range(2)]
    assert parts[0] and parts[1] and len(parts[0]) + len(parts[1]) == 6
    _ok(run_cli("merge", str(tmp_path / "merged.jsonl"), str(tmp_path / "part1.jsonl"), str(tmp_path / "part0.jsonl"),
                "--input", str(inp)))

    def texts(name):
        return [(r["id"], r["text"]) for r in map(json.loads, (tmp_path / name).read_text().splitlines())]

    assert texts("merged.jsonl") == texts("whole.jsonl")  # same answers, in the input's order
    # A shard still being written (a partial last line) is merged without its partial line, and left as it is.
    with open(tmp_path / "part1.jsonl", "a") as f:
        f.write('{"id": "q9", "te')
    before = (tmp_path / "part1.jsonl").read_bytes()
    _ok(run_cli("merge", str(tmp_path / "again.jsonl"), str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl"),
                "--input", str(inp)))
    assert (tmp_path / "part1.jsonl").read_bytes() == before
    assert texts("again.jsonl") == texts("whole.jsonl")
    # A shard missing is said, with exit code 1; the same shard twice is refused.
    missing = run_cli("merge", str(tmp_path / "half.jsonl"), str(tmp_path / "part0.jsonl"), "--input", str(inp))
    assert missing.returncode == 1 and b"have no result line" in missing.stderr
    twice = run_cli("merge", str(tmp_path / "twice.jsonl"), str(tmp_path / "part0.jsonl"),
                    str(tmp_path / "part0.jsonl"))
    assert twice.returncode == 1 and b"is in both" in twice.stderr and b"Traceback" not in twice.stderr


def test_eval_shards_merge_to_the_whole_run(model_path, tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"query": q}) + "\n" for q in
                            ["Describe rain.", "Describe snow.", "Describe wind.", "Describe fog."]))
    common = ("eval", "-d", str(data), "--query-field", "query", "--dimension", "honesty", "--verify",
              "no_commas,lowercase", "--verify-only", "--verify-limit", "4", "--verify-strength", "0.5",
              "--arms", "prompt-only", "-n", "8", "-m", str(model_path), "--no-fluency")
    _ok(run_cli(*common, "--run", str(tmp_path / "whole.jsonl")))
    for i in range(3):
        _ok(run_cli(*common, "--run", str(tmp_path / f"shard{i}.jsonl"), "--shard", f"{i}/3"))
    merged = tmp_path / "merged.jsonl"
    _ok(run_cli("merge", str(merged), *(str(tmp_path / f"shard{i}.jsonl") for i in range(3))))

    def compliance(name):
        s = json.loads((tmp_path / f"{name}.summary.json").read_text())
        return s["verifiable"], s["verifiable_overall"]

    assert compliance("merged") == compliance("whole") and compliance("whole")[0]
    checks = [json.loads(line) for line in merged.read_text().splitlines()[1:]]
    assert len([c for c in checks if c["type"] == "check"]) == 2 * 4 * 2  # instructions x queries x arms
    # Shards of other settings do not merge.
    _ok(run_cli(*common[:-1], "--run", str(tmp_path / "other.jsonl"), "--shard", "0/3"))  # fluency on
    clash = run_cli("merge", str(tmp_path / "clash.jsonl"), str(tmp_path / "shard1.jsonl"),
                    str(tmp_path / "other.jsonl"))
    assert clash.returncode == 1 and b"other settings" in clash.stderr
