"""``sda-local bench``: speed and memory, and concurrent requests through the scheduler (--serve)."""

from __future__ import annotations

import json

import click

from .common import exact_option, main, repack_option


@main.command()
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name.")
@click.option("--threads", "n_threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(8))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(256))
@click.option("--n-gpu-layers", default=0, show_default=True, type=int,
              help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal; every "
                   "arm alike.")
@click.option("--serve", "serve_bench", is_flag=True,
              help="Concurrent SDA requests through the scheduler (1, 2, 4) against the raw decode limit, the "
                   "scheduler's own work per step, and a late request's first-token latency.")
@click.option("--prefill", "prefill_tokens", default=None, type=click.IntRange(16),
              help="Instead: prefill speed of a prompt of this many tokens, plain and SDA, with exact ubatches "
                   "(--exact on: 32, or 16 on a build with another device) and llama.cpp's 512 (--exact off).")
@click.option("--json", "as_json", is_flag=True)
@repack_option
@exact_option
def bench(model, n_threads, tokens, runs, n_ctx, n_gpu_layers, serve_bench, prefill_tokens, as_json):
    """Speed and memory of plain vs SDA generation (medians of --runs, arms interleaved)."""
    progress = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if serve_bench and prefill_tokens:
        raise click.UsageError("--serve and --prefill are separate benchmarks: give one")
    if prefill_tokens:
        from ..bench import format_prefill_report, run_prefill_bench

        report = run_prefill_bench(model, n_threads=n_threads, prompt_tokens=prefill_tokens, runs=runs,
                                   n_ctx=max(n_ctx, prefill_tokens + 64), progress=progress, n_gpu_layers=n_gpu_layers)
        click.echo(json.dumps(report, indent=2) if as_json else format_prefill_report(report))
        return
    if serve_bench:
        from ..bench_serve import format_serve_report, run_serve_bench

        report = run_serve_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, progress=progress,
                                 n_gpu_layers=n_gpu_layers)
        click.echo(json.dumps(report, indent=2) if as_json else format_serve_report(report))
        return
    from ..bench import format_report, run_bench

    report = run_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, n_ctx=n_ctx, progress=progress,
                       n_gpu_layers=n_gpu_layers)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
