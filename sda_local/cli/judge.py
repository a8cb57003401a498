"""``sda-local judge`` (score one answer) and ``sda-local judge-bench`` (judges against ground truth)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InputError
from ..judging.factory import ENGINE_JUDGES
from .common import decode_arg, engine_options, judge_from_cli, judge_options, main, make_engine, seed_callback


@main.command()
@click.argument("query")
@click.argument("answer")
@click.option("--align", "-a", required=True, help="Preset or instruction text the answer is judged against.")
@judge_options
@click.option("--json", "as_json", is_flag=True, help="Print score, amplifier, rubric_version, judge as JSON.")
@engine_options
def judge(query, answer, align, judge, judge_url, amplifier_map, as_json, model, n_ctx, n_threads, n_gpu_layers,
          streams, verbose):
    """Score ANSWER to QUERY for --align (1-100, or r for --judge self) and show the amplifier it sets."""
    from ..pipeline import amplifier_of
    from ..prompts import check_text, resolve_alignment
    from ..judging import parse_judge_spec
    from ..rubrics import rubric_for

    query = check_text("query", decode_arg("query", query))
    answer = check_text("answer", decode_arg("answer", answer))
    alignment = resolve_alignment(check_text("--align", decode_arg("--align", align)))
    if alignment is None:
        raise InputError("--align needs a preset or an instruction")
    kind, arg = parse_judge_spec(judge, judge_url)
    if kind == "none" and not arg:
        raise InputError("--judge none cannot score an answer")
    engine = None
    if kind in ENGINE_JUDGES and not arg:  # this model judges (local:PATH loads its own)
        engine = make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = None
    try:
        judge_obj = judge_from_cli((judge, judge_url), engine)
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
        own = "the judge's own a"  # the self and verify judges set a themselves
        click.echo(f"score {judgement.shown()} -> a = {a:.3f} ({shown_map or own}; {judgement.rubric_version}; "
                   f"{judgement.judge})")



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
@judge_options
@click.option("--max-tokens", "-n", default=96, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_callback)
@click.option("--cache", "cache_path", default=Path("sda-judge-bench.jsonl"), show_default=True,
              type=click.Path(path_type=Path), help="Answers and scores, appended as they are made: a bench "
              "resumes from it, and another judge reuses its answers.")
@click.option("--chart", default=None, type=click.Path(path_type=Path), help="Write a PNG (needs sda-local[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the tables.")
@engine_options
def judge_bench(datasets, limit, offset, questions, verify, cases, sources, spread_limit, judge, judge_url, amplifier_map,
                max_tokens, seed, cache_path, chart, as_json, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Measure a judge against ground truth: TruthfulQA honesty, verifiable instructions, amplifier spread."""
    from ..evaluation.datasets import load_dataset
    from ..evaluation.judge_bench import BenchConfig, Cache, JudgeBench, report_markdown, write_chart
    from ..evaluation.verifiable import VERIFIABLE

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
    engine = make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    judge_obj = cache = None
    try:
        judge_obj = judge_from_cli((judge, judge_url), engine)
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
