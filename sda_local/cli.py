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
from .judging.factory import DEFAULT_JUDGE, ENGINE_JUDGES
from .engine.fusion import MAX_STRENGTH, MAX_T0, MIN_T0, MIN_TOP_P, TEMPERATURE_MODES
from .engine.layout import STREAM_MODES


class _Group(click.Group):
    """Every failure ends as one ``error: ...`` line and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:  # bad option values, unknown options: one line, click's exit code 2
            where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{where}", code=exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), code=exc.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", code=1)
        sys.exit(rv if isinstance(rv, int) else 0)

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
        except Exception as exc:  # an sda-local bug: still one line, the traceback goes to a crash report
            if os.environ.get("SDA_LOCAL_DEBUG"):
                raise
            report = _write_crash_report(exc)
            where = f"crash report: {report}" if report else "set SDA_LOCAL_DEBUG=1 for a traceback"
            _fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]} ({where})")


def _write_crash_report(exc: BaseException) -> Optional[str]:
    """The traceback, versions and command line in an owner-only file under the state directory (it may
    quote the user's text); its path, or None when it cannot be written."""
    import time
    import traceback

    from .privacy import private_dir, state_dir, write_private_text

    try:
        folder = private_dir(state_dir() / "crash-reports")
        path = folder / time.strftime(f"crash-%Y%m%d-%H%M%S-{os.getpid()}.txt")
        body = (f"sda-local {__version__}, Python {sys.version.split()[0]}, {sys.platform}\n"
                f"argv: {sys.argv!r}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        write_private_text(path, body)
        return str(path)
    except Exception:
        return None


def _fail(message: str, code: int = 1):
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


def _seed(ctx, param, value):
    # An InputError, not click's usage error: one line, and raised while parsing, before any model loads.
    from .seeds import check_seed

    return None if value is None else check_seed(value, "--seed")


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def _in_range(low: float, high: float, why: str = ""):
    """A callback that checks a float option before any model is loaded (finite, low <= value <= high)."""

    def check(ctx, param, value):
        value = _finite(ctx, param, value)
        if value is not None and not low <= value <= high:
            raise click.BadParameter(f"must be in [{low:g}, {high:g}]{why}, got {value:g}")
        return value

    return check


_strength_range = _in_range(0.0, MAX_STRENGTH, " (the paper's amplifier is in [0, 1])")
_t0_range = _in_range(MIN_T0, MAX_T0)


def _verify_strength(ctx, param, value):
    if value is None or value.strip().lower() == "judge":
        return "judge" if value is not None else None
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"must be a number or judge, got {value!r}") from None
    return _strength_range(ctx, param, number)
_top_p_range = _in_range(MIN_TOP_P, 1.0)


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
        _repack_option,
        _offline_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _set_repack(ctx, param, value):
    """--repack applies to every model this process (and its bench workers) loads: it sets SDA_LOCAL_REPACK."""
    from .hardware import REPACK_ENV

    if value is not None:
        os.environ[REPACK_ENV] = value
    return value


def _set_offline(ctx, param, value):
    """--offline applies to the whole process: it sets SDA_LOCAL_OFFLINE, which every network path checks."""
    from .privacy import OFFLINE_ENV

    if value:
        os.environ[OFFLINE_ENV] = "1"
    return value


_offline_option = click.option(
    "--offline", is_flag=True, expose_value=False, is_eager=True, callback=_set_offline,
    help="Refuse any network use (a model that is not cached, a remote judge); same as SDA_LOCAL_OFFLINE=1.")

_repack_option = click.option(
    "--repack", type=click.Choice(["auto", "on", "off"]), default=None, expose_value=False, is_eager=True,
    callback=_set_repack,
    help="llama.cpp weight repacking (extra buffer types). auto (default, or $SDA_LOCAL_REPACK): off on Intel AMX "
         "CPUs, whose AMX kernels crash in this llama.cpp, on elsewhere.")


def _judge_options(f):
    from .amplifier import AMPLIFIER_MAPS, DEFAULT_MAP
    from .judging import SCORINGS

    options = [
        click.option("--judge", "-j", default=None,
                     help="Who sets the amplifier from the first answer: self (default; no judge: the model's "
                          "likelihood ratio with and without the instruction), local (this model scores it under "
                          "a rubric), local:PATH|NAME, openai[:MODEL] (default gpt-4.1), none (fixed a = 0.5)."),
        click.option("--judge-scoring", type=click.Choice(list(SCORINGS)), expose_value=False,
                     callback=_store_judge_option("scoring"),
                     help="How a local judge scores: expected (the mean of its score distribution; default) or "
                          "greedy (its most likely score)."),
        click.option("--judge-url", default=None,
                     help="OpenAI-compatible base URL for the judge (llama-server, ollama, vLLM, ...); "
                          "key from SDA_JUDGE_API_KEY or OPENAI_API_KEY, or user:pass@ in the URL (HTTP Basic, "
                          "never shown)."),
        click.option("--amplifier-map", type=click.Choice(list(AMPLIFIER_MAPS)), default=DEFAULT_MAP,
                     show_default=True, help="Score -> amplifier map (sigmoid: the paper's Eq. 3)."),
        # Not parameters of the commands: collected into ctx.meta for _make_judge (see _remote_judge_options).
        click.option("--judge-timeout", type=click.FloatRange(0, min_open=True), expose_value=False,
                     callback=_store_judge_option("read_timeout"),
                     help="Seconds a remote judge may stay silent before the attempt fails (default 120)."),
        click.option("--judge-retries", type=click.IntRange(1), expose_value=False,
                     callback=_store_judge_option("max_attempts"),
                     help="Attempts per judgement, the first included; HTTP 429/5xx, timeouts and dropped "
                          "connections are retried (default 4)."),
        click.option("--judge-max-wait", type=click.FloatRange(0), expose_value=False,
                     callback=_store_judge_option("max_wait"),
                     help="Longest pause between attempts a server may ask for with Retry-After; a longer "
                          "one fails at once (default 60 s)."),
        click.option("--allow-insecure-judge", is_flag=True, expose_value=False,
                     callback=_store_judge_option("allow_insecure"),
                     help="Send the API key over plain http:// to a host other than this machine (refused "
                          "otherwise)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


_JUDGE_META = "sda_local.remote_judge_options"


def _store_judge_option(name: str):
    def store(ctx, param, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, got {value}")
        if value is not None and value is not False:
            ctx.meta.setdefault(_JUDGE_META, {})[name] = value
        return value

    return store


def _remote_judge_options() -> dict:
    """The --judge-scoring/--judge-timeout/--judge-retries/--judge-max-wait/--allow-insecure-judge given on
    this command line, as make_judge options (absent: the judge's defaults)."""
    return dict(click.get_current_context().meta.get(_JUDGE_META, {}))


def _is_remote(judge_spec) -> bool:
    from .judging import parse_judge_spec

    return parse_judge_spec(*judge_spec)[0] == "openai"


def _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose, parallel=1):
    from .engine import SDAEngine

    engine = SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, streams=streams,
                       verbose=verbose, parallel=parallel)
    for notice in engine.notices:
        click.echo(f"note: {notice}", err=True)
    return engine


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
@click.option("--strength", "-s", default=None, type=float, callback=_strength_range,
              help="Amplifier a, set by hand (0 = prompting with the instruction); skips the judge.")
@_judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True,
              help="What a failed judgement does: error | fixed:A | prompt-only.")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=None, type=int, callback=_seed, help="Sampling seed, 0..4294967294 (default: random).")
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default="paper", show_default=True)
@click.option("--t0", default=0.6, show_default=True, type=float, callback=_t0_range, help="Base temperature T0.")
@click.option("--top-p", default=0.95, show_default=True, type=float, callback=_top_p_range,
              help="Nucleus (top-p) mass.")
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, stats) instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Print generation statistics to stderr.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL file of {query, id?, instruction?, strength?, seed?, max_tokens?, temperature_mode?}.")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL results, appended line by line.")
@click.option("--resume", is_flag=True, help="Batch mode: skip ids already in --output.")
@click.option("--parallel", "-np", "parallel", default=1, show_default=True, type=click.IntRange(1, 128),
              help="Batch mode: lines generated at once, sharing one batched decode (same results as 1).")
@_engine_options
def generate(query, align, strength, judge, judge_url, amplifier_map, on_judge_failure, max_tokens, seed,
             temperature_mode, t0, top_p, system, as_json, show_stats, input_path, output_path, resume, parallel, model, n_ctx,
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
                        (model, n_ctx, n_threads, n_gpu_layers, streams, verbose), parallel)
        return
    if parallel != 1:
        raise InputError("--parallel applies to batch mode (--input/--output)")
    if query is None:
        raise InputError("missing QUERY (or use --input/--output for batch mode)")
    if not query.strip():
        raise InputError("query is empty")
    if align is None and (judge is not None or judge_url is not None or strength is not None):
        raise InputError("--strength, --judge and --judge-url need --align")
    from .pipeline import align_stream

    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        if align is not None:
            judge_obj = _make_judge(judge_spec, engine, needed=strength is None)
            stream = align_stream(engine, query, align, judge=judge_obj, **pipeline, **options)
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
    click.echo(f"judge {judgement.judge}: score {judgement.shown()} ({judgement.rubric_version}) -> a = {a:.3f}",
               err=True)


def _make_judge(judge_spec, engine, *, needed: bool = True, options: Optional[dict] = None):
    """The judge of --judge/--judge-url (None when not needed or "none"); a remote one announces itself.
    ``options``: make_judge's remote options (default: those on the command line)."""
    from .judging import RemoteJudge, make_judge

    spec, url = judge_spec
    if not needed:
        return None
    judge = make_judge(spec, engine, url=url, **(_remote_judge_options() if options is None else options))
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


def _generate_batch(input_path, output_path, resume, align, options, pipeline, judge_spec, engine_args, parallel):
    import threading

    from .batch import LINE_OPTIONS, run_batch
    from .pipeline import align as run_pipeline

    if not input_path.is_file():
        raise InputError(f"input file not found: {input_path}")
    judges = {}  # created on first need: a batch with explicit strengths never contacts a judge
    if _is_remote(judge_spec):  # making one contacts nothing: a refused URL or key stops the batch here
        judges["judge"] = _make_judge(judge_spec, None)
    engine = _make_engine(*engine_args, parallel=parallel)
    judge_lock = threading.Lock()

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
        if line_pipeline["strength"] is None:
            with judge_lock:
                if "judge" not in judges:
                    judges["judge"] = _make_judge(judge_spec, engine)
        result = run_pipeline(engine, job["query"], instruction, judge=judges.get("judge"), **line_pipeline,
                              **line_options)
        return result.to_dict()

    try:
        report = run_batch(input_path, output_path, generate_one, resume=resume,
                           on_event=lambda msg: click.echo(msg, err=True), parallel=parallel,
                           on_interrupt=engine.scheduler.stop)
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
    """Score ANSWER to QUERY for --align (1-100, or r for --judge self) and show the amplifier it sets."""
    from .pipeline import amplifier_of
    from .prompts import check_text, resolve_alignment
    from .judging import parse_judge_spec
    from .rubrics import rubric_for

    query = check_text("query", _decode_arg("query", query))
    answer = check_text("answer", _decode_arg("answer", answer))
    alignment = resolve_alignment(check_text("--align", _decode_arg("--align", align)))
    if alignment is None:
        raise InputError("--align needs a preset or an instruction")
    kind, arg = parse_judge_spec(judge, judge_url)
    if kind == "none" and not arg:
        raise InputError("--judge none cannot score an answer")
    engine = None
    if kind in ENGINE_JUDGES and not arg:  # this model judges (local:PATH loads its own)
        engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        judge_obj = _make_judge((judge, judge_url), engine)
        judgement = judge_obj.score(query, answer, rubric_for(alignment))
    finally:
        if judge_obj is not None:
            judge_obj.close()
        if engine is not None:
            engine.close()
    a = amplifier_of(judgement, amplifier_map)
    shown_map = None if judgement.amplifier is not None else amplifier_map  # the self judge maps r itself
    if as_json:
        click.echo(json.dumps({"score": judgement.score, "amplifier": a, "amplifier_map": shown_map,
                               "scoring": judgement.scoring, "spread": judgement.spread,
                               "distribution": judgement.distribution, "coverage": judgement.coverage,
                               "rubric_version": judgement.rubric_version, "judge": judgement.judge,
                               "reply": judgement.raw, "seconds": judgement.seconds}, ensure_ascii=False))
    else:
        click.echo(f"score {judgement.shown()} -> a = {a:.3f} ({shown_map or 'self map'}; {judgement.rubric_version}; "
                   f"{judgement.judge})")


# ---------------------------------------------------------------------------------------------- judge-bench
@main.command("judge-bench")
@click.option("--dataset", "-d", "datasets", multiple=True, type=click.Path(path_type=Path),
              help="Data set (repeatable). TruthfulQA: its Best vs Best Incorrect pairs, and its questions for the "
                   "verifiable instructions; every paper data set: the amplifier spread.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(0), help="TruthfulQA pairs (0: skip).")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0),
              help="First TruthfulQA item of the pairs and of the questions.")
@click.option("--questions", default=60, show_default=True, type=click.IntRange(0),
              help="Questions answered per verifiable instruction (0: skip that part).")
@click.option("--verify", default="all", show_default=True, help="Verifiable instructions: all or comma-separated ids.")
@click.option("--cases", default=100, show_default=True, type=click.IntRange(2),
              help="Scored cases per instruction at most, half compliant and half not.")
@click.option("--sources", default="base,prompt,steered", show_default=True,
              help="Answers to score per instruction: base (without it), prompt (with it, a = 0), steered (a = 1).")
@click.option("--spread-limit", default=20, show_default=True, type=click.IntRange(0),
              help="Items per data set for the amplifier spread (0: skip that part).")
@_judge_options
@click.option("--max-tokens", "-n", default=96, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, callback=_seed)
@click.option("--cache", "cache_path", default=Path("sda-judge-bench.jsonl"), show_default=True,
              type=click.Path(path_type=Path), help="Answers and scores, appended as they are made: a bench "
              "resumes from it, and another judge reuses its answers.")
@click.option("--chart", default=None, type=click.Path(path_type=Path), help="Write a PNG (needs sda-local[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the tables.")
@_engine_options
def judge_bench(datasets, limit, offset, questions, verify, cases, sources, spread_limit, judge, judge_url, amplifier_map,
                max_tokens, seed, cache_path, chart, as_json, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Measure a judge against ground truth: TruthfulQA honesty, verifiable instructions, amplifier spread."""
    from .datasets import load_dataset
    from .judge_bench import BenchConfig, Cache, JudgeBench, report_markdown, write_chart
    from .verifiable import VERIFIABLE

    if not datasets:
        raise InputError("give at least one --dataset (TruthfulQA for the pairs and questions; any paper set "
                         "for the amplifier spread)")
    truthfulqa = None
    spread = []
    for path in datasets:
        ds = load_dataset(path, limit=1)  # bad files fail here, before the model loads
        if ds.format is None:
            raise InputError(f"{path}: not one of the paper's data sets")
        if ds.format == "truthfulqa":
            truthfulqa = path
        spread.append(path)
    verify_ids = (list(VERIFIABLE) if verify.strip() == "all"
                  else [v.strip() for v in verify.split(",") if v.strip() and v.strip() != "none"])
    config = BenchConfig(truthfulqa=truthfulqa if limit else None, truthfulqa_limit=limit, truthfulqa_offset=offset,
                         questions=truthfulqa if questions and verify_ids else None, questions_limit=max(questions, 1),
                         questions_offset=offset, verify=verify_ids, cases=cases,
                         sources=[x.strip() for x in sources.split(",") if x.strip()],
                         spread_datasets=spread if spread_limit else [], spread_limit=max(spread_limit, 1),
                         max_tokens=max_tokens, seed=seed, amplifier_map=amplifier_map)
    config.check()
    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = cache = None
    try:
        judge_obj = _make_judge((judge, judge_url), engine)
        if judge_obj is None:
            raise InputError("--judge none has nothing to measure")
        cache = Cache(cache_path)
        progress = (lambda m: click.echo(f"\r{m[:100]:<100}", nl=False, err=True)) if sys.stderr.isatty() else (lambda m: None)
        result = JudgeBench(engine, judge_obj, config, cache, on_progress=progress).run()
    finally:
        if cache is not None:
            cache.close()
        if judge_obj is not None:
            judge_obj.close()
        engine.close()
    if sys.stderr.isatty():
        click.echo("", err=True)
    if chart is not None and not write_chart(result, chart):
        click.echo("note: no chart without matplotlib (pip install 'sda-local[plot]')", err=True)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo(report_markdown(result))


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
@click.option("--strength", "-s", default=None, type=float, callback=_strength_range,
              help="Amplifier a set by hand (default: auto, from the judge each turn).")
@_judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True, help="error | fixed:A | prompt-only.")
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--seed", default=None, type=int, callback=_seed,
              help="Seed of turn 1, 0..4294967294 (turn n: seed + n - 1, wrapping).")
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
    settings = ChatSettings(align=_decode_arg("--align", align), strength=strength, judge=judge or DEFAULT_JUDGE,
                            judge_url=judge_url, system=_decode_arg("--system", system), seed=seed,
                            max_tokens=max_tokens, temperature_mode=temperature_mode, amplifier_map=amplifier_map,
                            on_judge_failure=on_judge_failure, judge_options=_remote_judge_options())
    if judge_url and judge is None:
        settings.judge = "openai"
    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    log = None if no_log else ConversationLog()
    for warning in log.warnings if log is not None else ():
        _warn(warning)
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
def _eval_judge(config, judge_url: Optional[str]):
    """The judge spec and remote options of an eval run: the recorded ones, except that a --judge-url given
    again on --resume brings back the user:pass@ the run file leaves out, and judge options on this command
    line (--judge-timeout, ...) win over the recorded ones."""
    from .judging import redact_url

    url = config.judge_url
    if judge_url is not None:
        if redact_url(judge_url).rstrip("/") != (url or "").rstrip("/"):
            raise InputError(f"--judge-url differs from the judge URL of this run ({url or 'none'}): a resumed run "
                             "keeps its judge")
        url = judge_url
    return (config.judge, url), {**(config.judge_options or {}), **_remote_judge_options()}


@main.command("eval")
@click.option("--dataset", "-d", "datasets", multiple=True, type=click.Path(path_type=Path),
              help="JSONL data set (repeatable): one of the paper's five (detected) or any file with --query-field.")
@click.option("--query-field", default=None, help="Query field of a user data set.")
@click.option("--dimension", "dimensions", multiple=True,
              help="Dimension(s) for a user data set: a preset or an instruction (repeatable).")
@click.option("--arms", default=",".join(("base", "prompt-only", "steering-only", "sda")), show_default=True,
              help="Comma-separated arms; SDA is always run and compared with the others (so name at least one).")
@click.option("--limit", default=None, type=click.IntRange(1), help="Items per data set.")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
@click.option("--sample", default=None, type=click.IntRange(1), help="Draw this many items at random (seeded).")
@click.option("--seed", default=0, show_default=True, type=int, callback=_seed,
              help="Sampling, generation and order seed, 0..4294967294 (item i uses seed + i, wrapping).")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1))
@_judge_options
@click.option("--verify", default=None, help="Verifiable instructions to run: 'all' or comma-separated ids.")
@click.option("--verify-limit", default=30, show_default=True, type=click.IntRange(1),
              help="Queries (from the first data set) per verifiable instruction.")
@click.option("--verify-strength", default="0.5", show_default=True, callback=_verify_strength,
              help="a of the steered arms in the verifiable metric: a number, or judge (the full pipeline: the "
                   "judge scores the base answer and sets a; an sda-fixed arm at a = 0.5 runs beside it).")
@click.option("--verify-only", is_flag=True, help="Only the verifiable instructions, no pairwise judging.")
@click.option("--run", "run_path", default=None, type=click.Path(path_type=Path),
              help="Run file to create (default: sda-eval-<time>.jsonl).")
@click.option("--resume", "resume_path", default=None, type=click.Path(path_type=Path),
              help="Continue the run in this file (its settings are used).")
@click.option("--parallel", "-np", "parallel", default=1, show_default=True, type=click.IntRange(1, 128),
              help="Units run at once, sharing one batched decode (same answers as 1).")
@_engine_options
def eval_command(datasets, query_field, dimensions, arms, limit, offset, sample, seed, max_tokens, judge, judge_url,
                 amplifier_map, verify, verify_limit, verify_strength, verify_only, run_path, resume_path, parallel,
                 model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Evaluate SDA as the paper does (pairwise judging, gain omega) and with verifiable instructions.

    The paper's data sets are not shipped: see README for their sources and licences.
    """
    import time as _time

    from .evaluation import (EvalConfig, Evaluation, RunFile, judged_units, summarize, summary_markdown,
                             verify_units, write_chart)
    from .judging import make_judge, redact_url
    from .verifiable import VERIFIABLE

    if resume_path is not None:
        if datasets or run_path:
            raise InputError("--resume continues a run with its own settings: give no --dataset or --run")
        run = RunFile(resume_path)
    else:
        verify_ids = [] if not verify else (list(VERIFIABLE) if verify.strip() == "all"
                                            else [v.strip() for v in verify.split(",") if v.strip()])
        config = EvalConfig(
            # Resolved: a resumed run finds its files from any directory, and unit keys hash the resolved path.
            datasets=[{"path": str(p.resolve()), "query_field": query_field, "dimensions": list(dimensions)}
                      for p in datasets],
            arms=[a.strip() for a in arms.split(",") if a.strip()], offset=offset, limit=limit, sample=sample,
            seed=seed, max_tokens=max_tokens,
            # The pairwise protocol needs a judge that compares two answers; --verify-only takes the default.
            judge=judge or ("openai" if judge_url else (DEFAULT_JUDGE if verify_only else "local")),
            judge_url=redact_url(judge_url) if judge_url else None, judge_options=_remote_judge_options(),
            amplifier_map=amplifier_map, verify=verify_ids, verify_limit=verify_limit,
            verify_strength=verify_strength, model=model, verify_only=verify_only)
        config.check()
        if "sda" not in config.arms:
            config.arms.append("sda")
        run_path = run_path or Path(_time.strftime("sda-eval-%Y%m%d-%H%M%S.jsonl"))
        judged_units(config)  # bad data fails here, before the model loads or the run file is created
        verify_units(config)
        if _is_remote((config.judge, judge_url)):  # so does a refused judge URL or key (making one contacts nothing)
            make_judge(config.judge, None, url=judge_url, **config.judge_options).close()
        run = RunFile(run_path, config)
    config = run.config
    judge_spec, judge_options = _eval_judge(config, judge_url)  # before the model loads
    engine = _make_engine(config.model, n_ctx, n_threads, n_gpu_layers, streams, verbose, parallel=parallel)
    judge_obj = None
    try:
        judge_obj = _make_judge(judge_spec, engine, options=judge_options)
        if judge_obj is None:
            raise InputError("the evaluation needs a judge (--judge none is not possible here)")
        evaluation = Evaluation(engine, judge_obj, run, on_event=lambda m: click.echo(m, err=True))
        started = _time.monotonic()
        evaluation.execute(parallel=parallel)
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
    if evaluation.failed_units:  # as batch does: the summary is written, the exit code says work is left
        click.echo(f"{evaluation.failed_units} unit(s) failed; --resume {run.path} retries them", err=True)
        sys.exit(1)


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
@_offline_option
def models_pull(name, force):
    """Fetch a catalogue model into the cache (sha256 verified)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name), force=force))


@models.command("path")
@click.argument("name")
@_offline_option
def models_path(name):
    """Print the local path of a catalogue model (fetching it if needed)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name)))


# ---------------------------------------------------------------------------------------------- info
def info_dict() -> dict:
    from importlib import metadata

    import llama_cpp

    from . import hardware, privacy
    from .engine import native
    from . import models as catalogue
    from .logs import log_path

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
        "offline": privacy.offline(),
        "conversation_log": str(log_path()),
        "cpu": hardware.cpu_report().to_dict(),
        "repack": hardware.repack_decision(),
        "system_info": system_info.strip(),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_repack_option
@_offline_option
def info(as_json):
    """Versions, compiled-in llama.cpp backends, CPU features and the repack decision, native hook, model cache."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = info_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
        click.echo(f"{key:>18}: {value}")


# ---------------------------------------------------------------------------------------------- serve
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (a non-loopback one "
              "without --api-key gets a warning).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--parallel", "-np", "parallel", default=4, show_default=True, type=click.IntRange(1, 128),
              help="Slots: requests decoded together in one batch; more wait in the queue.")
@click.option("--ctx-size", "-c", "ctx_size", default=None, type=click.IntRange(16),
              help="Total context, split across the slots as llama-server does (default: 4096 per slot).")
@click.option("--queue", "queue_size", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; past it the server answers 429 with Retry-After.")
@click.option("--api-key", envvar="SDA_LOCAL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also $SDA_LOCAL_API_KEY).")
@click.option("--max-body", default=1 << 20, show_default=True, type=click.IntRange(1024),
              help="Largest request body in bytes (413 beyond).")
@click.option("--alias", default=None, help="Model id in /v1/models and responses (default: the GGUF file name).")
@_judge_options
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name (default: the default model).")
@click.option("--threads", "n_threads", default=None, type=click.IntRange(1), help="CPU threads (default: all).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int,
              help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal.")
@click.option("--streams", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
              help="batched: one context, every stream a sequence; contexts: two contexts on the same weights.")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
@_repack_option
@_offline_option
def serve(host, port, parallel, ctx_size, queue_size, api_key, max_body, alias, judge, judge_url, amplifier_map,
          model, n_threads, n_gpu_layers, streams, verbose):
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    A request steers with a top-level "sda" object ({"align": ..., "strength": ...}; the openai SDK sends
    it with extra_body); without one it is plain generation. Requests share one batched decode.
    """
    from . import models as catalogue
    from .server import is_loopback, run_server

    if amplifier_map != "sigmoid":
        raise InputError("--amplifier-map is chosen per request in serve (sda.amplifier_map)")
    n_ctx = (ctx_size // parallel) if ctx_size is not None else 4096
    if n_ctx < 16:
        raise InputError(f"--ctx-size {ctx_size} leaves {n_ctx} tokens per slot; give at least {16 * parallel}")
    if not is_loopback(host) and not api_key:
        _warn(f"listening on {host} without --api-key: anyone who can reach this address can use the model")
    model_path = catalogue.resolve(model)  # fetch (or fail) before the port opens
    judge_spec = (judge, judge_url)
    judge_options = _remote_judge_options()

    def load():
        from .engine import SDAEngine
        from .judging import make_judge

        engine = SDAEngine(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                           streams=streams, parallel=parallel, verbose=verbose)
        for notice in engine.notices:
            click.echo(f"note: {notice}", err=True)
        try:
            return engine, make_judge(judge_spec[0], engine, url=judge_spec[1], **judge_options)
        except BaseException:
            engine.close()
            raise

    run_server(load, model_id=alias or model_path.name, host=host, port=port, api_key=api_key,
               queue_size=queue_size, max_body=max_body,
               on_listening=lambda url: click.echo(f"sda-local: listening on {url} ({parallel} slots of "
                                                   f"{n_ctx} tokens)", err=True))


# ---------------------------------------------------------------------------------------------- bench
@main.command()
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name.")
@click.option("--threads", "n_threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(8))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(256))
@click.option("--serve", "serve_bench", is_flag=True,
              help="Concurrent SDA requests through the scheduler (1, 2, 4) against the raw decode limit, the "
                   "scheduler's own work per step, and a late request's first-token latency.")
@click.option("--json", "as_json", is_flag=True)
@_repack_option
def bench(model, n_threads, tokens, runs, n_ctx, serve_bench, as_json):
    """Speed and memory of plain vs SDA generation (medians of --runs, arms interleaved)."""
    progress = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if serve_bench:
        from .bench_serve import format_serve_report, run_serve_bench

        report = run_serve_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, progress=progress)
        click.echo(json.dumps(report, indent=2) if as_json else format_serve_report(report))
        return
    from .bench import format_report, run_bench

    report = run_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, n_ctx=n_ctx, progress=progress)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    main()
