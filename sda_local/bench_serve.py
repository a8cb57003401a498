"""``sda-local bench --serve``: what the scheduler makes of concurrent SDA requests.

For 1, 2 and 4 concurrent SDA requests (each two sequences, so 2, 4 and 8 rows per step), measured side
by side in one process, round after round:

* ``scheduler``: total tokens per second of the requests decoded together by the engine's scheduler
  (from the first step after their prefill to their last token);
* ``raw``: the decode limit, one ``llama_decode`` of the same number of rows per step on a context laid out
  like the scheduler's, with nothing else (no sampling, no fusion, no Python bookkeeping), in tokens per
  second of the requests it stands for.

Also: the scheduler's own work per step beyond ``llama_decode`` (median, as a share of the decode), and the
first-token latency of a request that arrives while three others decode, against its prefill time alone
plus two steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

from .engine import SDAEngine
from .engine.layout import KVLayout
from .engine.llama import logits_row

QUERIES = [
    "Write a detailed guide to planning a week-long hiking trip, with a packing list.",
    "Explain how a bicycle's gears work, with examples.",
    "Describe the water cycle for a curious ten-year-old.",
    "Give me a recipe for a simple vegetable soup, step by step.",
]
INSTRUCTION = "helpfulness"
CONCURRENCY = (1, 2, 4)
LATE_PROMPT = ("I am organising a community garden. " * 12) + "What should we plant first, and why?"


def _scheduler_tps(engine: SDAEngine, n: int, tokens: int, seed: int) -> tuple:
    """(tokens per second over the n requests, the steps' (total, decode) seconds after their prefill)."""
    scheduler = engine.scheduler
    engine.reset_caches()
    jobs = [engine.submit(engine.request(*_prompts(engine, QUERIES[i % len(QUERIES)]), strength=0.5,
                                         max_tokens=tokens, seed=seed + i, ignore_eos=True)) for i in range(n)]
    while not all(job.state == "decode" or job.done for job in jobs):  # prefill, then the measured part
        scheduler.step()
    started = time.perf_counter()
    mark = len(scheduler.timings)
    for job in jobs:
        scheduler.wait(job)
    elapsed = time.perf_counter() - started
    generated = sum(len(job.tokens) for job in jobs) - n  # the first token of each came with its prefill
    steps = list(scheduler.timings)[mark:]
    return generated / elapsed, steps


def _prompts(engine: SDAEngine, query: str):
    request = engine.stream(query, INSTRUCTION).request
    return request.prompt_with, request.prompt_without


def raw_steps_interleaved(engine: SDAEngine, row_counts, steps: int) -> list:
    """llama_decode steps per second for each of ``row_counts`` (sequences decoding one token each and nothing
    else: the decode limit of rows / 2 SDA requests, or of one plain request for 1 row). Their steps alternate,
    so that the machine's drift hits them alike and their ratio is measured, not guessed from two runs."""
    prompt = engine.tokenize_prompt(engine.render(None, QUERIES[0]))
    n_ctx = len(prompt) + steps + 1
    layouts = []
    try:
        for rows in row_counts:
            layouts.append(KVLayout("batched", engine.model, n_slots=(rows + 1) // 2, n_ctx=n_ctx,
                                    n_threads=engine.n_threads, batching=engine.batching))
        for layout, rows in zip(layouts, row_counts):
            batch = layout.batches[0]
            for seq in range(rows):
                batch.clear()
                for pos, token in enumerate(prompt):
                    batch.add(token, pos, seq, False)
                layout.decode(0)
        token, pos = prompt[-1], len(prompt)
        times = [[] for _ in row_counts]
        for _ in range(steps):
            for layout, rows, spent in zip(layouts, row_counts, times):
                batch = layout.batches[0]
                batch.clear()
                for seq in range(rows):
                    batch.add(token, pos, seq, True)
                started = time.perf_counter()
                layout.decode(0)
                logits_row(layout.contexts[0].row(0), engine.model.n_vocab)  # what a sampler reads first
                spent.append(time.perf_counter() - started)
            pos += 1
        return [1 / statistics.median(spent) for spent in times]
    finally:
        for layout in layouts:
            layout.close()


def _prefill_alone(engine: SDAEngine) -> float:
    engine.reset_caches()
    alone = engine.submit(engine.request(*_prompts(engine, LATE_PROMPT), strength=0.5, max_tokens=4, seed=9))
    engine.scheduler.wait(alone)
    return alone.stats.prefill_seconds


def _late_arrival(engine: SDAEngine, tokens: int) -> dict:
    """A request arriving while three others decode: its time to first token, against its prefill alone
    (the mean of one measurement just before and one just after, as the machine's speed drifts)."""
    scheduler = engine.scheduler
    before = _prefill_alone(engine)
    engine.reset_caches()
    others = [engine.submit(engine.request(*_prompts(engine, QUERIES[i]), strength=0.5, max_tokens=tokens,
                                           seed=i, ignore_eos=True)) for i in range(3)]
    while not all(job.state == "decode" for job in others):
        scheduler.step()
    for _ in range(5):
        scheduler.step()
    mark = len(scheduler.timings)
    arrived = time.perf_counter()
    job = engine.submit(engine.request(*_prompts(engine, LATE_PROMPT), strength=0.5, max_tokens=4, seed=9))
    while not job.tokens and not job.done:
        scheduler.step()
    first_token = time.perf_counter() - arrived
    steady = [total for total, _, _ in list(scheduler.timings)[mark - 5:mark]]
    for other in others:
        scheduler.cancel(other)
    scheduler.wait(job)
    for other in others:
        scheduler.wait(other)
    prefill_alone = (before + _prefill_alone(engine)) / 2
    step = statistics.median(steady)
    return {"first_token_seconds": first_token, "prefill_alone_seconds": prefill_alone, "step_seconds": step,
            "bound_seconds": prefill_alone + 2 * step, "within_bound": first_token <= prefill_alone + 2 * step}


def run_serve_bench(model: Optional[str], *, n_threads: int, tokens: int, runs: int,
                    progress: Callable[[str], None], n_gpu_layers: int = 0) -> dict:
    samples: Dict[str, Dict[int, List[float]]] = {"scheduler": {n: [] for n in CONCURRENCY},
                                                  "raw": {n: [] for n in CONCURRENCY}}
    overhead: List[float] = []
    with SDAEngine(model, n_ctx=1024, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                   parallel=max(CONCURRENCY)) as engine:
        _scheduler_tps(engine, 1, 16, 0)  # warm-up
        for r in range(runs):
            for n in CONCURRENCY:
                progress(f"run {r + 1}/{runs}: {n} concurrent")
                tps, steps = _scheduler_tps(engine, n, tokens, 100 * r)
                samples["scheduler"][n].append(tps)
                overhead += [(total - decode) / decode for total, decode, _ in steps if decode > 0]
                samples["raw"][n].append(n * raw_steps_interleaved(engine, (2 * n,), min(tokens, 64))[0])
        progress("late arrival")
        late = [_late_arrival(engine, tokens) for _ in range(runs)]
        model_path = str(engine.model_path)
    med = {arm: {n: statistics.median(v) for n, v in per.items()} for arm, per in samples.items()}
    return {
        "model": model_path, "threads": n_threads, "n_gpu_layers": n_gpu_layers, "tokens": tokens, "runs": runs,
        "tokens_per_second": med,
        "runs_tokens_per_second": {arm: {n: [round(x, 1) for x in v] for n, v in per.items()}
                                   for arm, per in samples.items()},
        "scaling": {n: med["scheduler"][n] / med["scheduler"][1] for n in CONCURRENCY},
        "raw_scaling": {n: med["raw"][n] / med["raw"][1] for n in CONCURRENCY},
        "step_overhead_share": statistics.median(overhead),
        "late_arrival": {
            "first_token_seconds": statistics.median(x["first_token_seconds"] for x in late),
            "prefill_alone_seconds": statistics.median(x["prefill_alone_seconds"] for x in late),
            "step_seconds": statistics.median(x["step_seconds"] for x in late),
            "within_bound_runs": sum(x["within_bound"] for x in late),
        },
    }


def format_serve_report(report: dict) -> str:
    t, s, raw = report["tokens_per_second"], report["scaling"], report["raw_scaling"]
    lines = [f"model {report['model']}, {report['threads']} threads, {report.get('n_gpu_layers', 0)} GPU layers, "
             f"{report['tokens']} tokens per request, "
             f"median of {report['runs']} runs",
             f"{'concurrent SDA requests':<24} {'scheduler tok/s':>16} {'raw limit tok/s':>16} {'x one':>7} "
             f"{'raw x one':>10}"]
    for n in t["scheduler"]:
        lines.append(f"{n:<24} {t['scheduler'][n]:>16.1f} {t['raw'][n]:>16.1f} {s[n]:>7.2f} {raw[n]:>10.2f}")
    late = report["late_arrival"]
    lines += [
        f"4 concurrent / one: {s[4]:.2f}  (target >= 1.25)",
        f"scheduler work per step beyond llama_decode: {100 * report['step_overhead_share']:.1f}% of it "
        "(target <= 5%)",
        f"late request, first token: {1000 * late['first_token_seconds']:.0f} ms; its prefill alone "
        f"{1000 * late['prefill_alone_seconds']:.0f} ms + 2 steps of {1000 * late['step_seconds']:.0f} ms "
        f"(within in {late['within_bound_runs']}/{report['runs']} runs)",
    ]
    return "\n".join(lines)
