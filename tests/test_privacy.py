"""Privacy: owner-only files, the offline mode, and proof that nothing leaves the machine with a local judge.

The network tests run the real CLI inside a network namespace of its own (``unshare -n``, no interface but a
down loopback) and under ``strace -f -e trace=connect``; each is skipped, with the reason, where the kernel or
the machine does not allow it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from fault_server import FaultServer

EXE = os.path.join(os.path.dirname(sys.executable), "sda-local")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "empathetic_dialogues_test.jsonl"
QUERY = "Name a colour."


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------- file modes
def chat_once(model_path, env, *extra, stdin=b"Name a colour.\n/bye\n"):
    return subprocess.run([EXE, "chat", "--model", str(model_path), "-n", "8", "--seed", "1", "--strength", "0.5",
                           "--align", "honesty", *extra], input=stdin, capture_output=True,
                          env=dict(os.environ, **env), timeout=300)


def test_chat_log_and_transcript_are_owner_only_even_with_a_lax_umask(model_path, tmp_path):
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if k != "SDA_LOCAL_LOG_DB"}  # the default location
    transcript = tmp_path / "talk.json"
    proc = subprocess.run(
        ["sh", "-c", f"umask 000 && exec {EXE} chat --model {model_path} -n 8 --seed 1"],
        input=f"Name a colour.\n/save {transcript}\n/bye\n".encode(), capture_output=True,
        env=dict(environ, XDG_DATA_HOME=str(home / "data")), timeout=300)
    assert proc.returncode == 0, proc.stderr
    db = home / "data" / "sda-local" / "logs.db"
    assert db.is_file() and mode_of(db) == 0o600
    assert mode_of(db.parent) == 0o700
    for companion in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        if companion.exists():
            assert mode_of(companion) == 0o600, companion
    assert mode_of(transcript) == 0o600 and json.loads(transcript.read_text())["turns"]


def test_an_existing_readable_log_gets_a_warning(model_path, tmp_path):
    db = tmp_path / "logs.db"
    sqlite3.connect(str(db)).close()
    os.chmod(db, 0o644)
    proc = chat_once(model_path, {"SDA_LOCAL_LOG_DB": str(db)})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "can be read by others" in err and f"chmod 600 {db}" in err
    assert mode_of(db) == 0o644  # told, not changed behind the user's back


def test_crash_reports_are_owner_only(tmp_path):
    # A catalogue entry without its fields is not a handled error: it ends as an internal error + crash report.
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps({"default": "x", "models": [{"name": "x"}]}))
    state = tmp_path / "state"
    proc = run_cli("models", "list", env={"SDA_LOCAL_CATALOGUE": str(catalogue), "XDG_STATE_HOME": str(state)})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: KeyError"), err
    report = Path(re.search(r"crash report: (\S+)\)$", lines[0]).group(1))
    assert report.parent == state / "sda-local" / "crash-reports"
    assert mode_of(report) == 0o600 and mode_of(report.parent) == 0o700
    assert "Traceback (most recent call last)" in report.read_text() and "KeyError" in report.read_text()


def test_output_files_follow_the_umask(model_path, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"query": QUERY, "instruction": None, "seed": 1, "max_tokens": 4}) + "\n")
    proc = subprocess.run(["sh", "-c", f"umask 022 && exec {EXE} generate --input {inp} --output {out} "
                                       f"--model {model_path}"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert mode_of(out) == 0o644


# ---------------------------------------------------------------------------------------------- offline mode
def test_offline_refuses_a_model_that_is_not_cached(tmp_path):
    env = {"SDA_LOCAL_CACHE": str(tmp_path / "empty-cache")}
    for args, extra_env in ((["models", "pull", "smollm2-135m-instruct", "--offline"], {}),
                            (["generate", QUERY], {"SDA_LOCAL_OFFLINE": "1"})):
        proc = run_cli(*args, env=dict(env, **extra_env))
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: offline mode"), err
        assert "is not cached" in err
    assert not list((tmp_path / "empty-cache").glob("*.gguf"))


def test_offline_refuses_a_remote_judge(model_path):
    with FaultServer([("score", 50)]) as server:
        for args in (["judge", QUERY, "Blue.", "--align", "honesty", "--judge-url", server.url, "--offline"],
                     ["generate", QUERY, "--align", "honesty", "--judge-url", server.url, "--model",
                      str(model_path), "--offline"]):
            proc = run_cli(*args)
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "Traceback" not in err, err
            assert "offline mode" in err and "remote judge" in err
        assert server.requests == []  # nothing was sent


def test_offline_still_runs_everything_local(model_path):
    proc = run_cli("generate", QUERY, "--align", "honesty", "-n", "8", "--seed", "1", "--model", str(model_path),
                   env={"SDA_LOCAL_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run_cli("info", "--json", env={"SDA_LOCAL_OFFLINE": "1"}).stdout)
    assert info["offline"] is True
    assert json.loads(run_cli("info", "--json", env={"SDA_LOCAL_OFFLINE": ""}).stdout)["offline"] is False


# ---------------------------------------------------------------------------------------------- no network
def _local_runs(model_path, tmp_path):
    """(name, argv, stdin) of runs that must work with no network at all, on the cached default model."""
    m = ["--model", str(model_path)]
    batch_in = tmp_path / "batch.jsonl"
    batch_in.write_text(json.dumps({"query": QUERY, "seed": 1, "max_tokens": 6}) + "\n"
                        + json.dumps({"query": "Name a fruit.", "seed": 2, "max_tokens": 6, "strength": 0.5}) + "\n")
    runs = [
        ("generate", ["generate", QUERY, "--align", "helpfulness", "-n", "8", "--seed", "1", *m], None),
        ("batch", ["generate", "--input", str(batch_in), "--output", str(tmp_path / "batch-out-{tag}.jsonl"),
                   "--align", "honesty", *m], None),
        ("chat", ["chat", "--align", "honesty", "-n", "8", "--seed", "1", *m], b"Name a colour.\n/bye\n"),
        ("judge", ["judge", QUERY, "Blue.", "--align", "honesty", "--json", *m], None),
    ]
    if DATA.is_file():
        runs.append(("eval", ["eval", "-d", str(DATA), "--limit", "1", "--verify", "no_commas", "--verify-limit", "1",
                              "--arms", "base,sda", "-n", "6", "--run", str(tmp_path / "eval-{tag}.jsonl"), *m], None))
    elif os.environ.get("CI"):
        pytest.fail(f"evaluation data not found at {DATA}")
    return runs


def _run(prefix, argv, stdin, tag, tmp_path):
    argv = [a.replace("{tag}", tag) for a in argv]
    env = dict(os.environ, SDA_LOCAL_LOG_DB=str(tmp_path / f"logs-{tag}.db"))
    return subprocess.run([*prefix, EXE, *argv], input=stdin, capture_output=True, env=env, timeout=600)


def _unshare_prefix():
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which(prefix[0]) is None:
            break
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_everything_local_works_without_a_network(model_path, tmp_path):
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("this kernel does not let us unshare the network namespace (unshare -n / -rn refused)")
    for name, argv, stdin in _local_runs(model_path, tmp_path):
        proc = _run(prefix, argv, stdin, f"netns-{name}", tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr.decode()[-800:]}"
    # The sandbox really has no network: a remote judge cannot be reached from inside it.
    with FaultServer([("score", 50)]) as server:
        proc = _run(prefix, ["judge", QUERY, "Blue.", "--align", "honesty", "--judge-url", server.url,
                             "--judge-retries", "1"], None, "netns-remote", tmp_path)
        assert proc.returncode == 1 and "connection failed" in proc.stderr.decode() and server.requests == []


_CONNECT = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)(.*?)\}")


def _connects(tmp_path, argv, stdin, tag):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    log = tmp_path / f"strace-{tag}.log"
    proc = _run(["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(log)], argv, stdin, tag, tmp_path)
    if "ptrace" in proc.stderr.decode() and proc.returncode != 0:
        pytest.skip("strace cannot trace here (ptrace refused)")
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    return [(m.group(1), m.group(2)) for m in _CONNECT.finditer(log.read_text())]


@pytest.mark.slow
def test_local_runs_make_no_inet_connection(model_path, tmp_path):
    for name, argv, stdin in _local_runs(model_path, tmp_path):
        inet = [c for c in _connects(tmp_path, argv, stdin, f"strace-{name}") if c[0] != "AF_UNIX"]
        assert inet == [], f"{name} connected to {inet}"


@pytest.mark.slow
def test_a_remote_judge_is_the_only_inet_connection(model_path, tmp_path):
    with FaultServer([("score", 50)]) as server:
        port = server.url.split(":")[2].split("/")[0]
        argv = ["generate", QUERY, "--align", "honesty", "--judge-url", server.url, "-n", "6", "--seed", "1",
                "--model", str(model_path)]
        inet = [c for c in _connects(tmp_path, argv, None, "strace-remote") if c[0] != "AF_UNIX"]
    assert inet, "the remote judge was not contacted"
    for family, address in inet:
        assert family == "AF_INET" and f"sin_port=htons({port})" in address and '127.0.0.1' in address, inet


def test_crash_reports_hold_no_credentials(tmp_path):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps({"default": "x", "models": [{"name": "x"}]}))
    state = tmp_path / "state"
    proc = run_cli("serve", "--api-key", "sekrit-key-123", "--model", "x",
                   env={"SDA_LOCAL_CATALOGUE": str(catalogue), "XDG_STATE_HOME": str(state),
                        "HF_TOKEN": "hf_token_value_456"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "crash report:" in err, err
    report = Path(re.search(r"crash report: (\S+)\)$", err.strip().splitlines()[-1]).group(1)).read_text()
    assert "KeyError" in report and "--api-key" in report
    assert "sekrit-key-123" not in report and "hf_token_value_456" not in report and "<redacted>" in report


def test_redact_argv_hides_credential_values():
    from sda_local.cli.common import redact_argv, redact_secrets

    argv = ["sda-local", "serve", "--api-key", "k1-value", "--judge-api-key=k2-value", "--token", "t-value",
            "--judge-url", "https://user:pw-value@judge.example/v1", "--port", "8080", "--max-tokens", "4096",
            "--keywords", "a"]
    shown = redact_argv(argv)
    assert shown == ["sda-local", "serve", "--api-key", "<redacted>", "--judge-api-key=<redacted>", "--token",
                     "<redacted>", "--judge-url", "https://<redacted>@judge.example/v1", "--port", "8080",
                     "--max-tokens", "4096", "--keywords", "a"]
    text = redact_secrets("got k1-value and k2-value, t-value, https://user:pw-value@judge.example", argv)
    assert not any(s in text for s in ("k1-value", "k2-value", "t-value", "pw-value")), text
