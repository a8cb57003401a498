"""``sda-local bench``: decode speed and peak memory of plain generation vs SDA.

Each measurement runs in its own process (``python -m sda_local.bench ARM ...``), so peak RSS belongs to
one arm, and the arms are interleaved round by round so that machine noise hits them alike. Decode speed
is measured the same way for every arm: (tokens - 1) / (time of last token - time of first token), with
end-of-generation tokens forbidden so that each run produces exactly ``tokens`` tokens.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import SDAError

QUERY = "Write a detailed guide to planning a week-long hiking trip, with a packing list."
ARMS = {
    "llama-cpp-python": "plain: llama_cpp.Llama.create_completion",
    "engine-plain": "plain: SDAEngine, instruction=None",
    "sda-batched": "SDA: one context, two sequences (native fusion)",
    "sda-contexts": "SDA: two contexts (native fusion)",
    "sda-batched-numpy": "SDA: one context, two sequences (numpy fusion)",
    "raw-decode": "llama_decode alone, 1 row and 2 rows a step, alternating (plain's and SDA's decode limits)",
}


def _timed(pieces) -> float:
    """Tokens per second after the first token; ``pieces`` yields one item per token, or its time stamp."""
    first = last = None
    count = 0
    for piece in pieces:
        now = piece if isinstance(piece, float) else time.perf_counter()
        first = now if first is None else first
        last = now
        count += 1
    if count < 2:
        raise SDAError("the benchmark generation produced fewer than 2 tokens")
    return (count - 1) / (last - first)


def _worker(arm: str, model: str, n_threads: int, tokens: int, n_ctx: int, n_gpu_layers: int = 0) -> dict:
    from . import models

    path = str(models.resolve(model, quiet=True))
    result: Dict[str, Optional[float]] = {"arm": arm}
    holder = {}  # the engine arms' last stream, for its stats
    if arm == "llama-cpp-python":
        import llama_cpp

        from .prompts import QUESTION_SYSTEM, PromptFormatter

        from .models.hardware import llama_cpp_repack

        with llama_cpp_repack():  # the same weight layout as the engine's arms (no AMX repacking on AMX CPUs)
            llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                  n_gpu_layers=n_gpu_layers, verbose=False)
        template = llm.metadata.get("tokenizer.chat_template")
        prompt = PromptFormatter(template, "", "").render(QUESTION_SYSTEM, QUERY)  # the engine's plain prompt
        eos = llm.token_eos()

        def run(n):
            # Stream chunks are not tokens (a multi-byte character spans several tokens and yields one chunk):
            # count tokens where llama-cpp-python samples them, in a logits processor that also forbids EOS.
            # (Not with logit_bias too: llama-cpp-python 0.3.36 then drops both processors, list.extend -> None.)
            ticks: List[float] = []

            def tick(_input_ids, scores):
                ticks.append(time.perf_counter())
                scores[eos] = -math.inf
                return scores

            stream = llm.create_completion(prompt, max_tokens=n, temperature=0.6, top_p=0.95, top_k=0, min_p=0.0,
                                           repeat_penalty=1.0, seed=1, stream=True,
                                           logits_processor=llama_cpp.LogitsProcessorList([tick]))
            for _ in stream:
                pass
            return ticks
    elif arm == "raw-decode":
        from .bench_serve import raw_steps_interleaved
        from .engine import SDAEngine

        with SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers) as engine:
            raw_steps_interleaved(engine, (1, 2), 8)  # warm-up
            one, two = raw_steps_interleaved(engine, (1, 2), tokens)
        # peak RSS: the model and two small raw layouts besides the engine's own (not comparable with the others)
        result.update(tokens_per_second=one, two_rows_tokens_per_second=two, peak_rss_mb=_peak_rss_mb())
        return result
    else:
        from .engine import SDAEngine

        streams = "contexts" if arm == "sda-contexts" else "batched"
        backend = "numpy" if arm.endswith("numpy") else "native"
        engine = SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, streams=streams,
                           fusion_backend=backend)
        instruction = None if arm == "engine-plain" else "helpfulness"

        def run(n):
            stream = engine.stream(QUERY, instruction, strength=0.5, max_tokens=n, seed=1, ignore_eos=True)
            holder["stream"] = stream
            return stream

    _timed(run(16))  # warm-up
    result["tokens_per_second"] = _timed(run(tokens))
    if holder:
        stats = holder["stream"].result.stats
        result["fusion_us_per_token"] = stats.fusion_us_per_token
        # The rest of the sampling call: llama.cpp filling the candidates, EOG ban, nucleus (top-p + draw).
        fusion = stats.fusion_us_per_token or 0.0
        result["chain_us_per_token"] = stats.sampling_us_per_token - fusion
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float:
    # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# A passage to cut prompts of a chosen length from (its text is irrelevant: only the token count matters).
PASSAGE = ("Planning a long hike starts with the route: its distance, the climbs, where water can be found, where "
           "the nights will be spent and how the weather tends to change in that season. ")
PREFILL_ARMS = {"exact": "on", "fast": "off"}  # --exact of each arm


def _prefill_worker(arm: str, model: str, n_threads: int, prompt_tokens: int, n_ctx: int, n_gpu_layers: int) -> dict:
    """Prefill of a ``prompt_tokens`` prompt, plain (one stream) and SDA (both streams), at the arm's ubatch."""
    from .engine import SDAEngine

    engine = SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                       exact=PREFILL_ARMS[arm])
    try:
        # The template's tokens around the question, then a question that fills the rest (plain prompt).
        overhead = engine.generate("Hi", None, max_tokens=1, seed=1).stats.prompt_tokens_with - 1
        ids = engine.model.tokenize(PASSAGE * (prompt_tokens // 8 + 1), add_bos=False, special=False)
        query = b"".join(engine.model.piece(t) for t in ids[:max(1, prompt_tokens - overhead)]).decode(
            "utf-8", errors="ignore").strip()
        result: Dict[str, Optional[float]] = {"arm": arm, "n_ubatch": engine.batching.n_ubatch}
        for name, instruction in (("plain", None), ("sda", "helpfulness")):
            engine.generate(query, instruction, max_tokens=1, seed=1)  # warm-up
            engine.reset_caches()
            stats = engine.generate(query, instruction, max_tokens=1, seed=1).stats
            engine.reset_caches()
            decoded = stats.prefill_tokens_with + (stats.prefill_tokens_without or 0)
            result[f"{name}_prompt_tokens"] = stats.prompt_tokens_with
            result[f"{name}_tokens_per_second"] = decoded / stats.prefill_seconds
            result[f"{name}_seconds"] = stats.prefill_seconds
        return result
    finally:
        engine.close()


def run_prefill_bench(model: Optional[str], *, n_threads: int, prompt_tokens: int, runs: int, n_ctx: int,
                      progress: Callable[[str], None], n_gpu_layers: int = 0) -> dict:
    """Prefill speed of a ``prompt_tokens`` prompt with exact ubatches (--exact on: 32, or 16 on a build with
    another device) and llama.cpp's 512 (--exact off)."""
    from . import models
    from .engine.layout import batch_policy

    model_path = str(models.resolve(model).resolve())
    samples = _interleaved(PREFILL_ARMS, runs, progress,
                           lambda arm: ["prefill", arm, model_path, str(n_threads), str(prompt_tokens), str(n_ctx),
                                        str(n_gpu_layers)])
    arms = {}
    for arm, rows in samples.items():
        arms[arm] = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "arm"}
    chosen = batch_policy(None, n_gpu_layers)
    return {"model": model_path, "threads": n_threads, "n_gpu_layers": n_gpu_layers, "prompt_tokens": prompt_tokens,
            "runs": runs, "arms": arms, "chosen": {"exact": chosen.exact, "n_ubatch": chosen.n_ubatch}}


def format_prefill_report(report: dict) -> str:
    lines = [f"model {report['model']}, {report['threads']} threads, {report['n_gpu_layers']} GPU layers, a "
             f"{report['prompt_tokens']}-token prompt, median of {report['runs']} runs",
             f"{'arm':<12} {'plain tok/s':>12} {'plain s':>9} {'SDA tok/s':>10} {'SDA s':>8}"]
    for arm, a in report["arms"].items():
        lines.append(f"{arm + ' (' + str(a['n_ubatch']) + ')':<12} {a['plain_tokens_per_second']:>12.1f} "
                     f"{a['plain_seconds']:>9.3f} {a['sda_tokens_per_second']:>10.1f} {a['sda_seconds']:>8.3f}")
    exact, fast = report["arms"]["exact"], report["arms"]["fast"]
    c = report["chosen"]
    lines += [f"ubatch {fast['n_ubatch']} / {exact['n_ubatch']}: plain "
              f"{fast['plain_tokens_per_second'] / exact['plain_tokens_per_second']:.2f}x, "
              f"SDA {fast['sda_tokens_per_second'] / exact['sda_tokens_per_second']:.2f}x",
              f"chosen here (--exact auto): ubatch {c['n_ubatch']} ({'exact' if c['exact'] else 'fast'})",
              "SDA tok/s counts the prompt tokens of both streams (the common prefix is decoded in each)."]
    return "\n".join(lines)


def _interleaved(arms, runs: int, progress: Callable[[str], None], argv: Callable[[str], List[str]]) -> Dict[str, List[dict]]:
    """Each arm's worker once per round, round after round, so that machine noise hits the arms alike.
    Workers start in the directory holding this very package, so that `-m` imports it (with its libsda)
    and not a source checkout that happens to be the current directory."""
    package_root = str(Path(__file__).resolve().parent.parent)
    samples: Dict[str, List[dict]] = {arm: [] for arm in arms}
    for r in range(runs):
        for arm in arms:
            progress(f"run {r + 1}/{runs}: {arm}")
            proc = subprocess.run([sys.executable, "-m", "sda_local.bench", *argv(arm)], capture_output=True,
                                  text=True, cwd=package_root)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
                raise SDAError(f"benchmark arm {arm} failed: {lines[-1]}")
            samples[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return samples


def run_bench(model: Optional[str], *, n_threads: int, tokens: int, runs: int, n_ctx: int,
              progress: Callable[[str], None], n_gpu_layers: int = 0) -> dict:
    from . import models

    model_path = str(models.resolve(model).resolve())  # fetch once, with progress, before the workers start
    samples = _interleaved(ARMS, runs, progress,
                           lambda arm: [arm, model_path, str(n_threads), str(tokens), str(n_ctx), str(n_gpu_layers)])

    def median(arm, key):
        values = [s[key] for s in samples[arm] if s.get(key) is not None]
        return statistics.median(values) if values else None

    arms = {
        arm: {
            "description": ARMS[arm],
            "tokens_per_second": median(arm, "tokens_per_second"),
            "tokens_per_second_runs": [round(s["tokens_per_second"], 2) for s in samples[arm]],
            "fusion_us_per_token": median(arm, "fusion_us_per_token"),
            "fusion_us_per_token_runs": [round(s["fusion_us_per_token"]) for s in samples[arm]
                                         if s.get("fusion_us_per_token") is not None],
            "chain_us_per_token": median(arm, "chain_us_per_token"),
            "peak_rss_mb": median(arm, "peak_rss_mb"),
        }
        for arm in ARMS
    }
    plain = arms["llama-cpp-python"]["tokens_per_second"]
    best = max(("sda-batched", "sda-contexts"), key=lambda a: arms[a]["tokens_per_second"])
    best_tps = arms[best]["tokens_per_second"]
    step_us = 1e6 / best_tps
    # What two rows a step cost against one, in the same run: SDA's ceiling against plain (per-run ratios, median).
    raw_ratio = statistics.median(r["two_rows_tokens_per_second"] / r["tokens_per_second"]
                                  for r in samples["raw-decode"])
    arms["raw-decode"]["two_rows_tokens_per_second"] = median("raw-decode", "two_rows_tokens_per_second")
    engine_ratio = statistics.median(sda["tokens_per_second"] / plain_run["tokens_per_second"]  # round by round
                                     for sda, plain_run in zip(samples[best], samples["engine-plain"]))
    return {
        "model": model_path,
        "threads": n_threads,
        "n_gpu_layers": n_gpu_layers,
        "tokens": tokens,
        "runs": runs,
        "n_ctx": n_ctx,
        "arms": arms,
        "summary": {
            "best_sda_mode": best,
            "sda_over_plain": best_tps / plain,
            "raw_2_rows_over_1": raw_ratio,
            "sda_over_engine_plain": engine_ratio,
            "sda_share_of_raw_ratio": engine_ratio / raw_ratio,
            "native_fusion_share_of_step": arms[best]["fusion_us_per_token"] / step_us,
            "sampling_share_of_step": (arms[best]["fusion_us_per_token"] + arms[best]["chain_us_per_token"]) / step_us,
            "sda_rss_over_plain_mb": arms[best]["peak_rss_mb"] - arms["llama-cpp-python"]["peak_rss_mb"],
        },
    }


def format_report(report: dict) -> str:
    lines = [
        f"model {report['model']}, {report['threads']} threads, {report.get('n_gpu_layers', 0)} GPU layers, "
        f"{report['tokens']} new tokens, "
        f"median of {report['runs']} runs, n_ctx {report['n_ctx']}",
        f"{'arm':<20} {'tok/s':>8} {'fusion us/tok':>14} {'chain us/tok':>13} {'peak RSS MB':>12}   runs (tok/s)",
    ]

    def us(value):
        return f"{value:.0f}" if value is not None else "-"

    for arm, a in report["arms"].items():
        lines.append(f"{arm:<20} {a['tokens_per_second']:>8.1f} {us(a['fusion_us_per_token']):>14} "
                     f"{us(a['chain_us_per_token']):>13} {a['peak_rss_mb']:>12.0f}   {a['tokens_per_second_runs']}")
    s = report["summary"]
    lines += [
        f"best SDA mode: {s['best_sda_mode']}",
        f"SDA / plain tok/s: {s['sda_over_plain']:.2f}  (target >= 0.55)",
        f"raw decode: 2 rows a step at {report['arms']['raw-decode']['two_rows_tokens_per_second']:.1f} tok/s, "
        f"{s['raw_2_rows_over_1']:.2f} of 1 row (the raw-decode arm's tok/s); SDA / engine plain: "
        f"{s['sda_over_engine_plain']:.2f} = {s['sda_share_of_raw_ratio']:.2f} of that ratio  (target >= 0.95); "
        "ratios are medians of each round's",
        f"native fusion share of an SDA step: {100 * s['native_fusion_share_of_step']:.1f}%  (target <= 3%)",
        f"sampling (fusion + rest of the chain) share of an SDA step: {100 * s['sampling_share_of_step']:.1f}%",
        "chain us/tok: the rest of the sampling call per token (llama.cpp filling the candidates, EOG ban, "
        "top-p and the draw)",
        f"SDA peak RSS - plain: {s['sda_rss_over_plain_mb']:+.0f} MB  (target <= 250 MB)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "prefill":
        arm, model_arg, threads, n_tokens, ctx, ngl = sys.argv[2:8]
        out = _prefill_worker(arm, model_arg, int(threads), int(n_tokens), int(ctx), int(ngl))
    else:
        arm, model_arg, threads, n_tokens, ctx = sys.argv[1:6]
        out = _worker(arm, model_arg, int(threads), int(n_tokens), int(ctx), int(sys.argv[6]) if len(sys.argv) > 6 else 0)
    print(json.dumps(out))
