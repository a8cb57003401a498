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

        from .hardware import llama_cpp_repack

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
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_bench(model: Optional[str], *, n_threads: int, tokens: int, runs: int, n_ctx: int,
              progress: Callable[[str], None], n_gpu_layers: int = 0) -> dict:
    from . import models

    model_path = str(models.resolve(model).resolve())  # fetch once, with progress, before the workers start
    # Workers start in the directory holding this very package, so that `-m` imports it (with its libsda)
    # and not a source checkout that happens to be the current directory.
    package_root = str(Path(__file__).resolve().parent.parent)
    samples: Dict[str, List[dict]] = {arm: [] for arm in ARMS}
    for r in range(runs):
        for arm in ARMS:
            progress(f"run {r + 1}/{runs}: {arm}")
            cmd = [sys.executable, "-m", "sda_local.bench", arm, model_path, str(n_threads), str(tokens), str(n_ctx),
                   str(n_gpu_layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=package_root)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
                raise SDAError(f"benchmark arm {arm} failed: {lines[-1]}")
            samples[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))

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
        f"native fusion share of an SDA step: {100 * s['native_fusion_share_of_step']:.1f}%  (target <= 3%)",
        f"sampling (fusion + rest of the chain) share of an SDA step: {100 * s['sampling_share_of_step']:.1f}%",
        "chain us/tok: the rest of the sampling call per token (llama.cpp filling the candidates, EOG ban, "
        "top-p and the draw)",
        f"SDA peak RSS - plain: {s['sda_rss_over_plain_mb']:+.0f} MB  (target <= 250 MB)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    arm, model_arg, threads, n_tokens, ctx = sys.argv[1:6]
    out = _worker(arm, model_arg, int(threads), int(n_tokens), int(ctx), int(sys.argv[6]) if len(sys.argv) > 6 else 0)
    print(json.dumps(out))
