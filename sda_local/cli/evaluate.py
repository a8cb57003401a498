"""``sda-local eval``: the paper's evaluation protocol and the verifiable instructions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import InputError
from ..shards import parse_shard
from ..engine.kvcache import DEFAULT_KV
from ..judging.factory import DEFAULT_JUDGE

DEFAULT_KV_SETTINGS = {"cache_type_k": DEFAULT_KV.type_k, "cache_type_v": DEFAULT_KV.type_v,
                       "flash_attn": DEFAULT_KV.flash_attn}
from .common import (
    engine_options, is_remote, judge_from_cli, judge_options, kv_given, kv_settings, main, make_engine,
    remote_judge_options, seed_callback, steering_options, verify_strength
)


def _eval_judge(config, judge_url: Optional[str]):
    """The judge spec and remote options of an eval run: the recorded ones, except that a --judge-url given
    again on --resume brings back the user:pass@ the run file leaves out, and judge options on this command
    line (--judge-timeout, ...) win over the recorded ones."""
    from ..judging import redact_url

    url = config.judge_url
    if judge_url is not None:
        if redact_url(judge_url).rstrip("/") != (url or "").rstrip("/"):
            raise InputError(f"--judge-url differs from the judge URL of this run ({url or 'none'}): a resumed run "
                             "keeps its judge")
        url = judge_url
    return (config.judge, url), {**(config.judge_options or {}), **remote_judge_options()}


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
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_callback,
              help="Sampling, generation and order seed, 0..4294967294 (item i uses seed + i, wrapping).")
@click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(1))
@judge_options
@click.option("--verify", default=None, help="Verifiable instructions to run: comma-separated ids; 'all' (this "
              "project's seven), 'ifeval' (the 25 IFEval types, needs sda-local[eval]) or ifeval:TYPE.")
@click.option("--temperature-mode", type=click.Choice(["paper", "reference", "fixed"]), default=None,
              help="Temperature of the sda arms (default: fixed, T0; paper: the paper's divergence-aware one).")
@click.option("--no-fluency", is_flag=True, help="Skip the fluency metric (a teacher-forced pass per answer).")
@steering_options
@click.option("--verify-limit", default=30, show_default=True, type=click.IntRange(1),
              help="Queries (from the first data set) per verifiable instruction.")
@click.option("--verify-strength", default="0.5", show_default=True, callback=verify_strength,
              help="a of the steered arms in the verifiable metric: a number, or judge (the full pipeline: the "
                   "judge scores the base answer and sets a; an sda-fixed arm at a = 0.5 runs beside it).")
@click.option("--verify-only", is_flag=True, help="Only the verifiable instructions, no pairwise judging.")
@click.option("--run", "run_path", default=None, type=click.Path(path_type=Path),
              help="Run file to create (default: sda-eval-<time>.jsonl).")
@click.option("--resume", "resume_path", default=None, type=click.Path(path_type=Path),
              help="Continue the run in this file (its settings are used).")
@click.option("--parallel", "-np", "parallel", default=1, show_default=True, type=click.IntRange(1, 128),
              help="Units run at once, sharing one batched decode (same answers as 1).")
@click.option("--shard", default=None, metavar="I/N", help="Only the units of shard I of N (0 <= I < N, split by "
              "unit key), to fan a run out over machines; join the shards' run files with `sda-local merge`.")
@engine_options
def eval_command(datasets, query_field, dimensions, arms, limit, offset, sample, seed, max_tokens, judge, judge_url,
                 amplifier_map, verify, temperature_mode, no_fluency, steering, verify_limit,
                 verify_strength, verify_only, run_path, resume_path, parallel, shard, model, n_ctx, n_threads, n_gpu_layers,
                 streams, verbose):
    """Evaluate SDA as the paper does (pairwise judging, gain omega) and with verifiable instructions.

    The paper's data sets are not shipped: see README for their sources and licences.
    """
    import time as _time

    from ..evaluation import EvalConfig, Evaluation, RunFile, judged_units, verify_units
    from ..judging import make_judge, redact_url
    from ..evaluation.verifiable import VERIFIABLE

    if resume_path is not None:
        if datasets or run_path or shard:
            raise InputError("--resume continues a run with its own settings: give no --dataset, --run or --shard")
        run = RunFile(resume_path)
    else:
        from ..evaluation import ifeval
        from ..evaluation.datasets import DEV_SET, DEV_SET_NAME

        verify_ids = []
        for v in (verify or "").split(","):
            v = v.strip()
            verify_ids += list(VERIFIABLE) if v == "all" else ifeval.all_ids() if v == "ifeval" else [v] if v else []
        verify_ids = list(dict.fromkeys(verify_ids))  # "all,no_commas": each instruction once
        datasets = [DEV_SET if str(p) == DEV_SET_NAME and not p.exists() else p for p in datasets]
        config = EvalConfig(
            # Resolved: a resumed run finds its files from any directory, and unit keys hash the resolved path.
            datasets=[{"path": str(p.resolve()), "query_field": query_field, "dimensions": list(dimensions)}
                      for p in datasets],
            arms=[a.strip() for a in arms.split(",") if a.strip()], offset=offset, limit=limit, sample=sample,
            seed=seed, max_tokens=max_tokens,
            # The pairwise protocol needs a judge that compares two answers; --verify-only takes the default.
            judge=judge or ("openai" if judge_url else (DEFAULT_JUDGE if verify_only else "local")),
            judge_url=redact_url(judge_url) if judge_url else None, judge_options=remote_judge_options(),
            amplifier_map=amplifier_map, verify=verify_ids, verify_limit=verify_limit,
            verify_strength=verify_strength, model=model, verify_only=verify_only, steering=steering.to_dict(),
            fluency=not no_fluency, temperature_mode=temperature_mode,
            shard=list(parse_shard(shard)) if shard is not None else None,
            kv_cache={**DEFAULT_KV_SETTINGS, **kv_settings()})
        config.check()
        if "sda" not in config.arms:
            config.arms.append("sda")
        run_path = run_path or Path(_time.strftime("sda-eval-%Y%m%d-%H%M%S.jsonl"))
        judged_units(config)  # bad data fails here, before the model loads or the run file is created
        verify_units(config)
        if is_remote((config.judge, judge_url)):  # so does a refused judge URL or key (making one contacts nothing)
            make_judge(config.judge, None, url=judge_url, **config.judge_options).close()
        run = RunFile(run_path, config)
    config = run.config
    judge_spec, judge_options = _eval_judge(config, judge_url)  # before the model loads
    kept = config.kv_cache or DEFAULT_KV_SETTINGS  # a run file from before the setting was recorded: the defaults
    differs = {name for name in kv_given() if kv_settings()[name] != kept.get(name)}
    if differs:
        recorded = ", ".join(f"--{n.replace('_', '-')} {kept[n]}" for n in sorted(differs))
        raise InputError(f"this run was made with {recorded}: --resume keeps a run's KV cache settings "
                         "(leave those options out, or give the same)")
    engine = make_engine(config.model, n_ctx, n_threads, n_gpu_layers, streams, verbose, parallel=parallel,
                         kv=kept)
    judge_obj = None
    try:
        judge_obj = judge_from_cli(judge_spec, engine, options=judge_options)
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
    write_summary(run, elapsed)
    if evaluation.failed_units:  # as batch does: the summary is written, the exit code says work is left
        click.echo(f"{evaluation.failed_units} unit(s) failed; --resume {run.path} retries them", err=True)
        sys.exit(1)


def write_summary(run, elapsed: float) -> None:
    """RUN.summary.json, RUN.summary.md and the chart of a run, and the summary on the terminal."""
    from ..evaluation import summarize, summary_markdown, write_chart

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


@main.command("merge")
@click.argument("output", type=click.Path(path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--input", "input_path", default=None, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Batch outputs: the input file, to write the results in its order and name missing ids.")
def merge_command(output, shards, input_path):
    """Join the outputs of --shard runs into OUTPUT: eval run files (then the summary, as eval writes it) or
    batch outputs of `generate --input`. Every shard once; a shard missing is named, and the exit code is 1."""
    from ..batch import merge_outputs
    from ..evaluation import merge_runs

    try:
        with open(shards[0], "rb") as f:
            first = f.readline()
    except OSError as exc:
        raise InputError(f"cannot read {shards[0]}: {exc.strerror}") from None
    try:
        is_run = json.loads(first).get("type") == "run"
    except (ValueError, AttributeError):
        is_run = False
    if is_run:
        if input_path is not None:
            raise InputError("--input is for batch outputs; eval run files carry their own settings")
        run, missing = merge_runs(list(shards), output)
        write_summary(run, 0.0)
        if missing:
            click.echo(f"shard(s) {', '.join(map(str, missing))} missing: the merged run is incomplete (--resume "
                       "it to run their units here)", err=True)
            sys.exit(1)
        return
    written, missing = merge_outputs(list(shards), output, input_path)
    click.echo(f"{written} result lines -> {output}", err=True)
    if missing:
        click.echo(f"{len(missing)} input id(s) have no result line", err=True)
        sys.exit(1)
