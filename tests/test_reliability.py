"""Bad environments and bad parameters: templates without a system role, a chat whose log or terminal
misbehaves, parameters that would overflow the fusion, an engine never closed, the context cap."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import pexpect
import pytest

from conftest import run_cli
from test_chat import PROMPT, spawn
from test_chat import command as say
from sda_local import SDAEngine
from sda_local.errors import InputError
from sda_local.prompts import PromptFormatter, resolve_alignment

EXE = os.path.join(os.path.dirname(sys.executable), "sda-local")
QUERY = "How do I fix a flat bike tyre?"

# Gemma 2's chat template as published with the model (tokenizer_config.json): it raises on a system message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


# ---------------------------------------------------------------------------------------------- templates
def test_a_template_without_system_role_gets_the_system_prompt_in_the_first_user_turn():
    formatter = PromptFormatter(GEMMA2_TEMPLATE, "<bos>", "<eos>")
    assert formatter.folds_system
    prompt = formatter.render("Be brief.", "Second question", [("First question", "First answer")])
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nFirst question<end_of_turn>\n"
                      "<start_of_turn>model\nFirst answer<end_of_turn>\n"
                      "<start_of_turn>user\nSecond question<end_of_turn>\n<start_of_turn>model\n")
    with_i, without = formatter.pair("Describe rain.", resolve_alignment("honesty"))
    assert with_i.startswith(without[: without.index("Describe rain.") + len("Describe rain.")])
    assert "raise_exception" not in with_i and "Be honest" in with_i


def test_generation_with_a_template_without_system_role(model_path):
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2) as engine:
        engine.formatter = PromptFormatter(GEMMA2_TEMPLATE, engine.model.bos_token, engine.model.eos_token)
        r = engine.generate(QUERY, "helpfulness", strength=0.5, seed=1, max_tokens=8, system="Be brief.")
        assert r.prompt_with.startswith(f"{engine.model.bos_token}<start_of_turn>user\nBe brief.\n\n{QUERY}")
        assert r.stats.generated_tokens >= 1
        chat = engine.generate("And then?", None, seed=1, max_tokens=4, history=[(QUERY, r.text)])
        assert chat.stats.generated_tokens >= 1


def test_a_template_that_cannot_render_is_a_one_line_model_error():
    from sda_local.errors import ModelError

    with pytest.raises(ModelError, match="chat template cannot render"):
        PromptFormatter("{{ raise_exception('nothing works') }}", "", "")


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("args, fragment", [
    (["--align", "honesty", "--strength", "1e39"], "--strength"),
    (["--align", "honesty", "--strength", "101"], "--strength"),
    (["--t0", "1e-30"], "--t0"),
    (["--t0", "1e39"], "--t0"),
    (["--top-p", "1e-9"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--seed", "4294967295"], "--seed"),
])
def test_out_of_range_parameters_fail_before_any_model_loads(args, fragment, tmp_path):
    # The model path does not exist: the error must be about the parameter, found before loading anything.
    proc = run_cli("generate", QUERY, *args, "--model", str(tmp_path / "missing.gguf"))
    err = proc.stderr.decode()
    assert proc.returncode in (1, 2) and "Traceback" not in err  # 2: click's usage errors
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "model file not found" not in err


def test_api_refuses_parameters_that_overflow_the_fusion(engine):
    for options, match in ((dict(strength=1e39), "strength"), (dict(t0=1e-30), "t0"), (dict(top_p=1e-9), "top_p"),
                           (dict(k=1e30), "k")):
        with pytest.raises(InputError, match=match):
            engine.generate(QUERY, "honesty", max_tokens=2, **options)


def test_n_ctx_beyond_the_training_context_is_capped_with_a_notice(model_path):
    with SDAEngine(str(model_path), n_ctx=10**6, n_threads=2, streams="contexts") as engine:
        assert engine.n_ctx == engine.model.n_ctx_train
        assert engine.notices and "capped at" in engine.notices[0]
    proc = run_cli("generate", "Hi", "-n", "2", "--seed", "1", "--n-ctx", "1000000", "--model", str(model_path))
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.decode().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "capped at 8192" in notes[0]


def test_click_usage_errors_are_one_line():
    proc = run_cli("generate", QUERY, "--no-such-option")
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: No such option")


# ---------------------------------------------------------------------------------------------- lifecycle
def test_an_engine_never_closed_exits_quietly(model_path):
    script = textwrap.dedent(f"""
        from sda_local import SDAEngine
        from sda_local.judging.local import complete_with_grammar
        engine = SDAEngine({str(model_path)!r}, n_ctx=256, n_threads=2)
        judge_engine = SDAEngine({str(model_path)!r}, n_ctx=256, n_threads=2, streams="contexts")
        print(engine.generate("Hi", "honesty", strength=0.5, seed=1, max_tokens=3).stats.generated_tokens)
        print(complete_with_grammar(judge_engine, None, "Hi", 'root ::= "ok"'))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_close_is_idempotent_and_a_closed_engine_says_so(model_path):
    engine = SDAEngine(str(model_path), n_ctx=256, n_threads=2)
    engine.close()
    engine.close()
    with pytest.raises(Exception, match="closed"):
        engine.generate(QUERY, None, max_tokens=2)


# ---------------------------------------------------------------------------------------------- chat
@pytest.mark.slow
def test_chat_keeps_turns_the_locked_log_refused_and_writes_them_later(model_path, tmp_path):
    db = tmp_path / "logs.db"  # where test_chat.spawn puts the log
    child = spawn(model_path, tmp_path, "-n", "6")
    say(child, "Name a colour.")
    blocker = sqlite3.connect(str(db), timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    out = say(child, "Name a fruit.")
    assert "warning: could not write to the conversation log" in out and "database is locked" in out
    assert "to be written at the next turn" in out
    blocker.execute("COMMIT")
    blocker.close()
    say(child, "Name a tree.")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    rows = sqlite3.connect(str(db)).execute("SELECT turn, query FROM turns ORDER BY id").fetchall()
    assert rows == [(1, "Name a colour."), (2, "Name a fruit."), (3, "Name a tree.")]


def test_chat_survives_undecodable_input(model_path, tmp_path):
    proc = subprocess.run([EXE, "chat", "--model", str(model_path), "-n", "4", "--seed", "1", "--no-log"],
                          input=b"caf\xe9 au lait\nName a colour.\n/bye\n", capture_output=True, timeout=300)
    out = proc.stdout.decode("utf-8", errors="replace")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.decode(), proc.stderr
    assert "error: that message is not valid UTF-8 text" in out
    assert out.count(PROMPT) >= 3  # the chat went on to the next message and to /bye


def test_chat_seeds_do_not_repeat_after_trimming(model_path):
    from sda_local.chat import ChatSession, ChatSettings

    seeds = []
    with SDAEngine(str(model_path), n_ctx=256, n_threads=2) as engine:
        session = ChatSession(engine, ChatSettings(seed=4294967290, max_tokens=40), say=lambda m: None)
        original = engine.stream

        def recording_stream(*args, **kwargs):
            seeds.append(kwargs["seed"])
            return original(*args, **kwargs)

        engine.stream = recording_stream
        for i in range(8):
            list(session.reply(f"Tell me one long true sentence about the number {i}."))
        assert len(session.turns) < 8  # turns were dropped to fit the 256-token context
    assert len(set(seeds)) == 8 and 4294967295 not in seeds
    assert seeds[:6] == [4294967290, 4294967291, 4294967292, 4294967293, 4294967294, 0]


def test_chat_keeps_turns_a_full_disk_refused_and_writes_them_later(model_path, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) stops the log's files from growing, as a full
    disk would; the turn is kept, and written once the log can grow again."""
    db = tmp_path / "logs.db"
    script = textwrap.dedent(f"""
        import os, resource, sqlite3
        from sda_local import SDAEngine
        from sda_local.chat import ChatSession, ChatSettings
        from sda_local.logs import ConversationLog

        said = []
        with SDAEngine({str(model_path)!r}, n_ctx=512, n_threads=2) as engine:
            session = ChatSession(engine, ChatSettings(seed=1, max_tokens=8), say=said.append,
                                  log=ConversationLog({str(db)!r}))
            list(session.reply("Name a colour."))
            size = max(os.path.getsize(p) for p in ({str(db)!r}, {str(db)!r} + "-wal") if os.path.exists(p))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))  # no file may grow
            list(session.reply("Name a fruit."))
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            list(session.reply("Name a tree."))
            session.close()
            session.log.close()
        print(repr(said))
        rows = sqlite3.connect({str(db)!r}).execute("SELECT turn, query FROM turns ORDER BY id").fetchall()
        print(rows)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    said, rows = proc.stdout.strip().splitlines()[-2:]
    assert "could not write to the conversation log" in said and "to be written at the next turn" in said
    assert rows == "[(1, 'Name a colour.'), (2, 'Name a fruit.'), (3, 'Name a tree.')]"
