"""``sda-local chat`` and ``sda-local logs``."""

from __future__ import annotations

import json
import sys

import click

from ..engine.fusion import DEFAULT_TEMPERATURE_MODE, TEMPERATURE_MODES
from ..errors import InputError, SDAError
from ..judging.factory import DEFAULT_JUDGE
from .common import (
    decode_arg, engine_options, judge_options, main, make_engine, remote_judge_options, seed_callback,
    strength_range, warn
)


def _read_message(prompt: str = ">>> ") -> str:
    """One message: a line, or the lines between \"\"\" and \"\"\" (ollama style)."""
    line = input(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    if text.rstrip().endswith('"""') and text.strip():
        return text.rstrip()[:-3]
    lines = [text] if text else []
    while True:
        line = input("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


@main.command()
@click.option("--align", "-a", default=None, help="Preset or instruction text (default: plain chat).")
@click.option("--strength", "-s", default=None, type=float, callback=strength_range,
              help="Amplifier a set by hand (default: auto, from the judge each turn).")
@judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True, help="error | fixed:A | prompt-only.")
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--seed", default=None, type=int, callback=seed_callback,
              help="Seed of turn 1, 0..4294967294 (turn n: seed + n - 1, wrapping).")
@click.option("--max-tokens", "-n", default=512, show_default=True, type=click.IntRange(1))
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default=DEFAULT_TEMPERATURE_MODE,
              show_default=True, help="fixed: T0; paper: the paper's divergence-aware temperature; reference.")
@click.option("--no-log", is_flag=True, help="Do not append the turns to the conversation log.")
@engine_options
def chat(align, strength, judge, judge_url, amplifier_map, on_judge_failure, system, seed, max_tokens,
         temperature_mode, no_log, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Interactive chat with SDA on every turn (/help for commands, Ctrl-D or /bye to quit)."""
    from ..chat import ChatExit, ChatSession, ChatSettings
    from ..logs import ConversationLog

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    settings = ChatSettings(align=decode_arg("--align", align), strength=strength, judge=judge or DEFAULT_JUDGE,
                            judge_url=judge_url, system=decode_arg("--system", system), seed=seed,
                            max_tokens=max_tokens, temperature_mode=temperature_mode, amplifier_map=amplifier_map,
                            on_judge_failure=on_judge_failure, judge_options=remote_judge_options())
    if judge_url and judge is None:
        settings.judge = "openai"
    engine = make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    click.echo(engine.describe_memory(), err=True)
    log = None if no_log else ConversationLog()
    for warning in log.warnings if log is not None else ():
        warn(warning)
    # Bytes that are not UTF-8 (a terminal in another encoding, a pasted binary) arrive as surrogate escapes
    # and are refused as one message, instead of ending the chat with a decoding error.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    session = None
    try:
        session = ChatSession(engine, settings, say=lambda m: click.echo(m), log=log)
        mode = "plain" if settings.align is None else (
            f"align {settings.align}, strength {'auto' if strength is None else f'{strength:g}'}")
        click.echo(f"sda-local chat: {engine.model_path.name} ({mode}). /help for commands, Ctrl-D or /bye to quit.")
        while True:
            try:
                message = _read_message()
            except EOFError:
                click.echo()
                break
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /bye to quit)")
                continue
            if not message.strip():
                continue
            try:
                message.encode("utf-8")
            except UnicodeEncodeError:
                click.echo("error: that message is not valid UTF-8 text (check your terminal's encoding)")
                continue
            if message.lstrip().startswith("/"):
                try:
                    click.echo(session.command(message))
                except ChatExit:
                    break
                continue
            try:
                for piece in session.reply(message):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                click.echo()
            except KeyboardInterrupt:
                click.echo(" [interrupted]")
            except SDAError as exc:
                click.echo(f"error: {exc}")
    finally:
        if session is not None:
            session.close()
        if log is not None:
            log.close()
        engine.close()


@main.command()
@click.option("-n", "count", default=3, show_default=True, type=click.IntRange(1), help="How many recent turns.")
@click.option("--json", "as_json", is_flag=True)
def logs(count, as_json):
    """Show the most recent chat turns from the conversation log."""
    from ..logs import ConversationLog, log_path

    if not log_path().exists():
        raise InputError(f"no conversation log yet ({log_path()})")
    log = ConversationLog()
    try:
        rows = log.recent(count)
    finally:
        log.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for r in rows:
        a = f", a = {r['amplifier']:.3f}" if r["amplifier"] is not None else ""
        score = f", score {r['score']}" if r["score"] is not None else ""
        flag = " [interrupted]" if r["interrupted"] else ""
        click.echo(f"# {r['time']}  conversation {r['conversation'][:8]} turn {r['turn']}{score}{a}{flag}")
        click.echo(f"> {r['query']}")
        click.echo(r["reply"])
        click.echo()
