"""The ``sda-local`` command line: a thin layer over the Python API (SDAEngine, models, batch)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .errors import InputError, SDAError
from .fusion import TEMPERATURE_MODES
from .streams import STREAM_MODES


class _Group(click.Group):
    """Every failure ends as one ``error: ...`` line and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SDAError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): nothing left to say
            sys.exit(1)
        except MemoryError:
            _fail("out of memory")
        except Exception as exc:  # an sda-local bug: still one line, with a way to get the traceback
            if os.environ.get("SDA_LOCAL_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set SDA_LOCAL_DEBUG=1 for a traceback)")


def _fail(message: str, code: int = 1):
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sda-local")
def main():
    """Training-free alignment of local GGUF models at inference time (SDA), inside llama.cpp."""


# ---------------------------------------------------------------------------------------------- generate
def _engine_options(f):
    options = [
        click.option("--model", "-m", default=None, help="GGUF path or catalogue name (default: the default model)."),
        click.option("--n-ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context per stream."),
        click.option("--threads", "n_threads", default=None, type=click.IntRange(1), help="CPU threads (default: all)."),
        click.option("--n-gpu-layers", default=0, show_default=True, type=int,
                     help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal."),
        click.option("--streams", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
                     help="batched: one context, two sequences; contexts: two contexts on the same weights."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _judge_options(f):
    from .amplifier import AMPLIFIER_MAPS, DEFAULT_MAP

    options = [
        click.option("--judge", "-j", default=None,
                     help="Who scores the first answer: local (this model, default), local:PATH|NAME, "
                          "openai[:MODEL] (default gpt-4.1), none (fixed a = 0.5)."),
        click.option("--judge-url", default=None,
                     help="OpenAI-compatible base URL for the judge (llama-server, ollama, vLLM, ...); "
                          "key from SDA_JUDGE_API_KEY or OPENAI_API_KEY."),
        click.option("--amplifier-map", type=click.Choice(list(AMPLIFIER_MAPS)), default=DEFAULT_MAP,
                     show_default=True, help="Score -> amplifier map (sigmoid: the paper's Eq. 3)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    from .engine import SDAEngine

    return SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, streams=streams,
                     verbose=verbose)


def _decode_arg(name: str, value: Optional[str]) -> Optional[str]:
    """argv text that was not valid UTF-8 arrives with surrogate escapes: reject it clearly."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    return value


@main.command()
@click.argument("query", required=False)
@click.option("--align", "-a", default=None, help="Preset (helpfulness, harmlessness, honesty, empathy, "
              "summarization) or any instruction text. Without it: plain generation.")
@click.option("--strength", "-s", default=None, type=float, callback=_finite,
              help="Amplifier a, set by hand (0 = prompting with the instruction); skips the judge.")
@_judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True,
              help="What a failed judgement does: error | fixed:A | prompt-only.")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1), help="Sampling seed (default: random).")
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default="paper", show_default=True)
@click.option("--t0", default=0.6, show_default=True, type=float, callback=_finite, help="Base temperature T0.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, stats) instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Print generation statistics to stderr.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL file of {query, id?, instruction?, strength?, seed?, max_tokens?, temperature_mode?}.")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL results, appended line by line.")
@click.option("--resume", is_flag=True, help="Batch mode: skip ids already in --output.")
@_engine_options
def generate(query, align, strength, judge, judge_url, amplifier_map, on_judge_failure, max_tokens, seed,
             temperature_mode, t0, top_p, system, as_json, show_stats, input_path, output_path, resume, model, n_ctx,
             n_threads, n_gpu_layers, streams, verbose):
    """Answer QUERY with SDA steering towards --align (streamed to stdout).

    With --align and no --strength, the full pipeline runs: a first answer without the instruction, a judge
    scores it (--judge, local by default), the score sets the amplifier, then the SDA answer.
    """
    query = _decode_arg("query", query)
    align = _decode_arg("--align", align)
    if align is not None and align.strip().lower() == "none":
        align = None
    system = _decode_arg("--system", system)
    options = dict(max_tokens=max_tokens, t0=t0, top_p=top_p, temperature_mode=temperature_mode, seed=seed,
                   system=system)
    pipeline = dict(strength=strength, amplifier_map=amplifier_map, on_judge_failure=on_judge_failure,
                    on_warning=_warn, on_judged=_report_judgement)
    judge_spec = (judge, judge_url)
    if input_path is not None or output_path is not None:
        if query is not None:
            raise InputError("give either a QUERY or --input/--output, not both")
        if input_path is None or output_path is None:
            raise InputError("batch mode needs both --input and --output")
        _generate_batch(input_path, output_path, resume, align, options, pipeline, judge_spec,
                        (model, n_ctx, n_threads, n_gpu_layers, streams, verbose))
        return
    if query is None:
        raise InputError("missing QUERY (or use --input/--output for batch mode)")
    if not query.strip():
        raise InputError("query is empty")
    if align is None and (judge is not None or judge_url is not None or strength is not None):
        raise InputError("--strength, --judge and --judge-url need --align")
    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        if align is not None:
            judge_obj = _make_judge(judge_spec, engine, needed=strength is None)
            stream = engine.align_stream(query, align, judge=judge_obj, **pipeline, **options)
        else:
            stream = engine.stream(query, None, **options)
        if as_json:
            for _ in stream:
                pass
            result = stream.result
            data = result.to_dict() if align is not None else {"text": result.text, "stats": result.stats.to_dict()}
            click.echo(json.dumps(data, ensure_ascii=False))
        else:
            out = sys.stdout
            for piece in stream:
                out.write(piece)
                out.flush()
            out.write("\n")
            result = stream.result
        if show_stats:
            _print_stats(result.stats)
    finally:
        if judge_obj is not None:
            judge_obj.close()
        engine.close()


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _report_judgement(judgement, a: float) -> None:
    click.echo(f"judge {judgement.judge}: score {judgement.score}/100 ({judgement.rubric_version}) -> a = {a:.3f}",
               err=True)


def _make_judge(judge_spec, engine, *, needed: bool = True):
    """The judge of --judge/--judge-url (None when not needed or "none"); a remote one announces itself."""
    from .judges import RemoteJudge, make_judge

    spec, url = judge_spec
    if not needed:
        return None
    judge = make_judge(spec, engine, url=url)
    if isinstance(judge, RemoteJudge):
        click.echo(f"sda-local: answers are sent to {judge.url} for judging", err=True)
    return judge


def _print_stats(stats) -> None:
    line = (f"{stats.mode}: {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
            f"prefill {stats.prefill_seconds:.2f}s, finish={stats.finish_reason}")
    if stats.mode == "sda":
        line += (f", a={stats.strength:g}, mean T={stats.mean_temperature:.3f}, mean JS={stats.mean_js:.4f}, "
                 f"fusion {stats.fusion_us_per_token:.0f} us/token ({stats.fusion_backend}, {stats.streams})")
    click.echo(line, err=True)


def _generate_batch(input_path, output_path, resume, align, options, pipeline, judge_spec, engine_args):
    from .batch import LINE_OPTIONS, run_batch

    if not input_path.is_file():
        raise InputError(f"input file not found: {input_path}")
    engine = _make_engine(*engine_args)
    judges = {}  # created on first need: a batch with explicit strengths never contacts a judge

    def generate_one(job: dict) -> dict:
        line_options = dict(options)
        line_pipeline = dict(pipeline, on_judged=lambda judgement, a: None)
        for key in LINE_OPTIONS[1:]:
            if key in job and job[key] is not None:
                (line_pipeline if key == "strength" else line_options)[key] = job[key]
        instruction = job["instruction"] if "instruction" in job else align
        if instruction is not None and not isinstance(instruction, str):
            raise InputError('"instruction" must be a string or null')
        if instruction is None:
            result = engine.generate(job["query"], None, **line_options)
            return {"text": result.text, "stats": result.stats.to_dict()}
        if line_pipeline["strength"] is None and "judge" not in judges:
            judges["judge"] = _make_judge(judge_spec, engine)
        result = engine.align(job["query"], instruction, judge=judges.get("judge"), **line_pipeline, **line_options)
        return result.to_dict()

    try:
        report = run_batch(input_path, output_path, generate_one, resume=resume,
                           on_event=lambda msg: click.echo(msg, err=True))
    finally:
        if judges.get("judge") is not None:
            judges["judge"].close()
        engine.close()
    click.echo(f"{report.done} generated, {report.skipped} already done, {report.failed} failed "
               f"(of {report.total} lines) -> {output_path}", err=True)
    if report.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- judge
@main.command()
@click.argument("query")
@click.argument("answer")
@click.option("--align", "-a", required=True, help="Preset or instruction text the answer is judged against.")
@_judge_options
@click.option("--json", "as_json", is_flag=True, help="Print score, amplifier, rubric_version, judge as JSON.")
@_engine_options
def judge(query, answer, align, judge, judge_url, amplifier_map, as_json, model, n_ctx, n_threads, n_gpu_layers,
          streams, verbose):
    """Score ANSWER to QUERY for --align (1-100) and show the amplifier it sets."""
    from .amplifier import amplifier
    from .prompts import check_text, resolve_alignment
    from .rubrics import rubric_for

    query = check_text("query", _decode_arg("query", query))
    answer = check_text("answer", _decode_arg("answer", answer))
    alignment = resolve_alignment(check_text("--align", _decode_arg("--align", align)))
    if alignment is None:
        raise InputError("--align needs a preset or an instruction")
    spec = judge if judge is not None else ("openai" if judge_url else "local")
    if spec.strip().lower() == "none":
        raise InputError("--judge none cannot score an answer")
    engine = None
    if spec.strip().lower() == "local":
        engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        judge_obj = _make_judge((spec, judge_url), engine)
        judgement = judge_obj.score(query, answer, rubric_for(alignment))
    finally:
        if judge_obj is not None:
            judge_obj.close()
        if engine is not None:
            engine.close()
    a = amplifier(judgement.score, amplifier_map)
    if as_json:
        click.echo(json.dumps({"score": judgement.score, "amplifier": a, "amplifier_map": amplifier_map,
                               "rubric_version": judgement.rubric_version, "judge": judgement.judge,
                               "reply": judgement.raw, "seconds": judgement.seconds}, ensure_ascii=False))
    else:
        click.echo(f"score {judgement.score}/100 -> a = {a:.3f} ({amplifier_map}; {judgement.rubric_version}; "
                   f"{judgement.judge})")


# ---------------------------------------------------------------------------------------------- chat
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
@click.option("--strength", "-s", default=None, type=float, callback=_finite,
              help="Amplifier a set by hand (default: auto, from the judge each turn).")
@_judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True, help="error | fixed:A | prompt-only.")
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1), help="Seed of turn 1 (turn n: seed + n - 1).")
@click.option("--max-tokens", "-n", default=512, show_default=True, type=click.IntRange(1))
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default="paper", show_default=True)
@click.option("--no-log", is_flag=True, help="Do not append the turns to the conversation log.")
@_engine_options
def chat(align, strength, judge, judge_url, amplifier_map, on_judge_failure, system, seed, max_tokens,
         temperature_mode, no_log, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Interactive chat with SDA on every turn (/help for commands, Ctrl-D or /bye to quit)."""
    from .chat import ChatExit, ChatSession, ChatSettings
    from .logs import ConversationLog

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    settings = ChatSettings(align=_decode_arg("--align", align), strength=strength, judge=judge or "local",
                            judge_url=judge_url, system=_decode_arg("--system", system), seed=seed,
                            max_tokens=max_tokens, temperature_mode=temperature_mode, amplifier_map=amplifier_map,
                            on_judge_failure=on_judge_failure)
    if judge_url and judge is None:
        settings.judge = "openai"
    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    log = None if no_log else ConversationLog()
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
    from .logs import ConversationLog, log_path

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


# ---------------------------------------------------------------------------------------------- eval
@main.command("eval")
@click.option("--dataset", "-d", "datasets", multiple=True, type=click.Path(path_type=Path),
              help="JSONL data set (repeatable): one of the paper's five (detected) or any file with --query-field.")
@click.option("--query-field", default=None, help="Query field of a user data set.")
@click.option("--dimension", "dimensions", multiple=True,
              help="Dimension(s) for a user data set: a preset or an instruction (repeatable).")
@click.option("--arms", default=",".join(("base", "prompt-only", "steering-only", "sda")), show_default=True,
              help="Comma-separated arms; SDA is always run and judged against the others.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Items per data set.")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@click.option("--sample", default=None, type=click.IntRange(1), help="Draw this many items at random (seeded).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Sampling, generation and order seed.")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1))
@_judge_options
@click.option("--verify", default=None, help="Verifiable instructions to run: 'all' or comma-separated ids.")
@click.option("--verify-limit", default=30, show_default=True, type=click.IntRange(1),
              help="Queries (from the first data set) per verifiable instruction.")
@click.option("--verify-strength", default=0.5, show_default=True, type=float, callback=_finite,
              help="Fixed a of the steered arms in the verifiable metric.")
@click.option("--run", "run_path", default=None, type=click.Path(path_type=Path),
              help="Run file to create (default: sda-eval-<time>.jsonl).")
@click.option("--resume", "resume_path", default=None, type=click.Path(path_type=Path),
              help="Continue the run in this file (its settings are used).")
@_engine_options
def eval_command(datasets, query_field, dimensions, arms, limit, offset, sample, seed, max_tokens, judge, judge_url,
                 amplifier_map, verify, verify_limit, verify_strength, run_path, resume_path, model, n_ctx, n_threads,
                 n_gpu_layers, streams, verbose):
    """Evaluate SDA as the paper does (pairwise judging, gain omega) and with verifiable instructions.

    The paper's data sets are not shipped: see README for their sources and licences.
    """
    import time as _time

    from .evaluation import (EvalConfig, Evaluation, RunFile, judged_units, summarize, summary_markdown,
                             verify_units, write_chart)
    from .verifiable import VERIFIABLE

    if resume_path is not None:
        if datasets or run_path:
            raise InputError("--resume continues a run with its own settings: give no --dataset or --run")
        run = RunFile(resume_path)
    else:
        verify_ids = [] if not verify else (list(VERIFIABLE) if verify.strip() == "all"
                                            else [v.strip() for v in verify.split(",") if v.strip()])
        config = EvalConfig(
            datasets=[{"path": str(p), "query_field": query_field, "dimensions": list(dimensions)} for p in datasets],
            arms=[a.strip() for a in arms.split(",") if a.strip()], offset=offset, limit=limit, sample=sample,
            seed=seed, max_tokens=max_tokens, judge=judge or ("openai" if judge_url else "local"), judge_url=judge_url,
            amplifier_map=amplifier_map, verify=verify_ids, verify_limit=verify_limit,
            verify_strength=verify_strength, model=model)
        config.check()
        if "sda" not in config.arms:
            config.arms.append("sda")
        run_path = run_path or Path(_time.strftime("sda-eval-%Y%m%d-%H%M%S.jsonl"))
        judged_units(config)  # bad data fails here, before the model loads or the run file is created
        verify_units(config)
        run = RunFile(run_path, config)
    config = run.config
    engine = _make_engine(config.model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        judge_obj = _make_judge((config.judge, config.judge_url), engine)
        if judge_obj is None:
            raise InputError("the evaluation needs a judge (--judge none is not possible here)")
        evaluation = Evaluation(engine, judge_obj, run, on_event=lambda m: click.echo(m, err=True))
        started = _time.monotonic()
        evaluation.execute()
        elapsed = _time.monotonic() - started
    finally:
        if judge_obj is not None:
            judge_obj.close()
        run.close()
        engine.close()
    summary = summarize(run.records)
    summary["run"] = str(run.path)
    summary["elapsed_seconds_this_session"] = elapsed
    base = run.path.with_suffix("")
    Path(f"{base}.summary.json").write_text(json.dumps(summary, indent=2))
    markdown = summary_markdown(summary)
    Path(f"{base}.summary.md").write_text(markdown + "\n")
    chart = Path(f"{base}.png")
    drew = write_chart(summary, chart)
    click.echo(markdown)
    click.echo(f"\nrun: {run.path}; summary: {base}.summary.md, {base}.summary.json"
               + (f", chart: {chart}" if drew else " (pip install 'sda-local[plot]' for the chart)")
               + f"; {elapsed:.0f} s")


# ---------------------------------------------------------------------------------------------- models
@main.group(cls=_Group)
def models():
    """The catalogue of named GGUF models and the local cache."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """List catalogue models and whether they are cached."""
    from . import models as catalogue

    default = catalogue.default_model_name()
    rows = [
        {"name": m.name, "aliases": list(m.aliases), "default": m.name == default, "size_bytes": m.size,
         "licence": m.licence, "cached": m.is_cached(), "path": str(m.cached_path), "description": m.description}
        for m in catalogue.catalogue()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "cached" if r["cached"] else "not cached"
        click.echo(f"{mark} {r['name']:<24} {r['size_bytes'] / 1e6:6.0f} MB  {r['licence']:<18} {state:<10}  "
                   f"{r['description']}")


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch again even if cached.")
def models_pull(name, force):
    """Fetch a catalogue model into the cache (sha256 verified)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name), force=force))


@models.command("path")
@click.argument("name")
def models_path(name):
    """Print the local path of a catalogue model (fetching it if needed)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name)))


# ---------------------------------------------------------------------------------------------- info
def info_dict() -> dict:
    from importlib import metadata

    import llama_cpp

    from . import models as catalogue
    from . import native

    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    backends = [seg.split(" : ")[0].strip() for seg in system_info.split(" | ") if " : " in seg]
    lib = native.library()
    return {
        "sda_local": __version__,
        "llama_cpp_python": metadata.version("llama-cpp-python"),
        "python": sys.version.split()[0],
        "llama_cpp_backends": backends,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "native": lib is not None,
        "native_path": native.loaded_path(),
        "native_error": native.load_error(),
        "model_cache": str(catalogue.cache_dir()),
        "default_model": catalogue.default_model_name(),
        "system_info": system_info.strip(),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True)
def info(as_json):
    """Versions, compiled-in llama.cpp backends, native hook status, model cache."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = info_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:>18}: {value}")


# ---------------------------------------------------------------------------------------------- bench
@main.command()
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name.")
@click.option("--threads", "n_threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(8))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(256))
@click.option("--json", "as_json", is_flag=True)
def bench(model, n_threads, tokens, runs, n_ctx, as_json):
    """Speed and memory of plain vs SDA generation (medians of --runs, arms interleaved)."""
    from .bench import format_report, run_bench

    report = run_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, n_ctx=n_ctx,
                       progress=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    main()
