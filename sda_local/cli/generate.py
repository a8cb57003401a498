"""``sda-local generate``: one query (streamed or --json) or a JSONL batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..engine.fusion import DEFAULT_TEMPERATURE_MODE, TEMPERATURE_MODES
from ..errors import InputError
from ..shards import parse_shard
from .common import (
    decode_arg, engine_options, is_remote, judge_from_cli, judge_options, main, make_engine, print_stats,
    remote_judge_options, report_judgement, seed_callback, steering_options, strength_range,
    t0_range, top_p_range, warn
)


@main.command()
@click.argument("query", required=False)
@click.option("--align", "-a", default=None, help="Preset (helpfulness, harmlessness, honesty, empathy, "
              "summarization) or any instruction text. Without it: plain generation.")
@click.option("--strength", "-s", default=None, type=float, callback=strength_range,
              help="Amplifier a, set by hand (0 = prompting with the instruction); skips the judge.")
@judge_options
@click.option("--on-judge-failure", default="fixed:0.5", show_default=True,
              help="What a failed judgement does: error | fixed:A | prompt-only.")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=None, type=int, callback=seed_callback, help="Sampling seed, 0..4294967294 (default: random).")
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default=DEFAULT_TEMPERATURE_MODE,
              show_default=True, help="fixed: T0; paper: the paper's divergence-aware temperature; reference.")
@click.option("--t0", default=0.6, show_default=True, type=float, callback=t0_range, help="Base temperature T0.")
@click.option("--top-p", default=0.95, show_default=True, type=float, callback=top_p_range,
              help="Nucleus (top-p) mass.")
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, stats) instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Print generation statistics to stderr.")
@click.option("--compare", is_flag=True, help="Also answer with prompting alone (the instruction, a = 0) for the "
              "same seed, and show both answers side by side with a, the mean JS and the echo/degeneration flags.")
@steering_options
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL file of {query, id?, instruction?, strength?, seed?, max_tokens?, temperature_mode?}.")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL results, appended line by line.")
@click.option("--resume", is_flag=True, help="Batch mode: skip ids already in --output.")
@click.option("--parallel", "-np", "parallel", default=1, show_default=True, type=click.IntRange(1, 128),
              help="Batch mode: lines generated at once, sharing one batched decode (same results as 1).")
@click.option("--shard", default=None, metavar="I/N", help="Batch mode: only the lines of shard I of N (0 <= I < "
              "N, split by id); join the shards' outputs with `sda-local merge`.")
@engine_options
def generate(query, align, strength, judge, judge_url, amplifier_map, on_judge_failure, max_tokens, seed,
             temperature_mode, t0, top_p, system, as_json, show_stats, compare, steering, input_path, output_path, resume,
             parallel, shard, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Answer QUERY with SDA steering towards --align (streamed to stdout).

    With --align and no --strength, the full pipeline runs: a first answer, a judge scores it (--judge; auto
    by default: a program's check for an instruction it can verify, prompted first; else the self judge, on an
    answer without the instruction), the score sets the amplifier, then the SDA answer.
    """
    query = decode_arg("query", query)
    align = decode_arg("--align", align)
    if align is not None and align.strip().lower() == "none":
        align = None
    system = decode_arg("--system", system)
    options = dict(max_tokens=max_tokens, t0=t0, top_p=top_p, temperature_mode=temperature_mode, seed=seed,
                   system=system, steering=steering)
    pipeline = dict(strength=strength, amplifier_map=amplifier_map, on_judge_failure=on_judge_failure,
                    on_warning=warn, on_judged=report_judgement)
    judge_spec = (judge, judge_url)
    if compare and align is None:
        raise InputError("--compare needs --align (it compares prompting alone with SDA)")
    if input_path is not None or output_path is not None:
        if compare:
            raise InputError("--compare applies to one QUERY, not to batch mode")
        if query is not None:
            raise InputError("give either a QUERY or --input/--output, not both")
        if input_path is None or output_path is None:
            raise InputError("batch mode needs both --input and --output")
        _generate_batch(input_path, output_path, resume, align, options, pipeline, judge_spec,
                        (model, n_ctx, n_threads, n_gpu_layers, streams, verbose), parallel, parse_shard(shard))
        return
    if shard is not None:
        raise InputError("--shard applies to batch mode (--input/--output)")
    if parallel != 1:
        raise InputError("--parallel applies to batch mode (--input/--output)")
    if query is None:
        raise InputError("missing QUERY (or use --input/--output for batch mode)")
    if not query.strip():
        raise InputError("query is empty")
    if align is None and (judge is not None or judge_url is not None or strength is not None):
        raise InputError("--strength, --judge and --judge-url need --align")
    from ..pipeline import align_stream

    engine = make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        if compare:
            import secrets

            from ..compare import compare_answers, render_comparison

            judge_obj = judge_from_cli(judge_spec, engine, needed=strength is None)
            if options["seed"] is None:  # both answers need the same one
                options["seed"] = secrets.randbelow(2**31)
            comparison = compare_answers(engine, query, align, judge=judge_obj, pipeline=pipeline, options=options)
            if as_json:
                click.echo(json.dumps(comparison.to_dict(), ensure_ascii=False))
            else:
                click.echo(render_comparison(comparison))
            if show_stats:
                print_stats(comparison.sda.stats)
                click.echo(engine.describe_memory(), err=True)
            return
        if align is not None:
            judge_obj = judge_from_cli(judge_spec, engine, needed=strength is None)
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
            print_stats(result.stats)
            click.echo(engine.describe_memory(), err=True)
    finally:
        if judge_obj is not None:
            judge_obj.close()
        engine.close()



def _generate_batch(input_path, output_path, resume, align, options, pipeline, judge_spec, engine_args, parallel,
                    shard):
    import threading

    from ..batch import LINE_OPTIONS, run_batch
    from ..pipeline import align as run_pipeline

    if not input_path.is_file():
        raise InputError(f"input file not found: {input_path}")
    judge_settings = remote_judge_options()  # read here: worker threads have no click context
    judges = {}  # created on first need: a batch with explicit strengths never contacts a judge
    if is_remote(judge_spec):  # making one contacts nothing: a refused URL or key stops the batch here
        judges["judge"] = judge_from_cli(judge_spec, None)
    engine = make_engine(*engine_args, parallel=parallel)
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
                    judges["judge"] = judge_from_cli(judge_spec, engine, options=judge_settings)
        result = run_pipeline(engine, job["query"], instruction, judge=judges.get("judge"), **line_pipeline,
                              **line_options)
        return result.to_dict()

    try:
        report = run_batch(input_path, output_path, generate_one, resume=resume,
                           on_event=lambda msg: click.echo(msg, err=True), parallel=parallel,
                           on_interrupt=engine.scheduler.stop, shard=shard)
    finally:
        if judges.get("judge") is not None:
            judges["judge"].close()
        engine.close()
    others = f"; {report.other_shards} left to other shards" if shard is not None else ""
    click.echo(f"{report.done} generated, {report.skipped} already done, {report.failed} failed "
               f"(of {report.total} lines{others}) -> {output_path}", err=True)
    if report.failed:
        sys.exit(1)
