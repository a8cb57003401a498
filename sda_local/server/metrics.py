"""Counters for ``GET /metrics`` (Prometheus text format 0.0.4)."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, Tuple


class Metrics:
    def __init__(self, gauges: Dict[str, Tuple[str, Callable[[], float]]]):
        """``gauges``: name -> (help, read it now)."""
        self._lock = threading.Lock()
        self._requests: Dict[Tuple[str, int], int] = collections.Counter()
        self._gauges = gauges
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.generations = 0
        self.amplifier_sum = 0.0
        self.amplifier_count = 0
        self.js_sum = 0.0
        self.js_count = 0

    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def observe_generation(self, stats) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += stats.prompt_tokens_with + (stats.prompt_tokens_without or 0)
            self.cached_tokens += stats.cached_tokens
            self.generated_tokens += stats.generated_tokens
            if stats.mean_js is not None:
                self.js_sum += stats.mean_js
                self.js_count += 1

    def observe_amplifier(self, a: float) -> None:
        with self._lock:
            self.amplifier_sum += a
            self.amplifier_count += 1

    def render(self) -> str:
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP sda_{name} {help_text}")
            lines.append(f"# TYPE sda_{name} {kind}")
            for labels, value in samples:
                lines.append(f"sda_{name}{labels} {value}")

        with self._lock:
            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self._requests.items())])
            metric("generations_total", "counter", "Generations finished (an SDA request with a judge has two).",
                   [("", self.generations)])
            metric("prompt_tokens_total", "counter", "Prompt tokens over every stream.", [("", self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's cache.",
                   [("", self.cached_tokens)])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            mean_a = self.amplifier_sum / self.amplifier_count if self.amplifier_count else 0.0
            metric("amplifier_mean", "gauge", "Mean amplifier a of the SDA requests so far.", [("", f"{mean_a:.6g}")])
            metric("amplifier_observations_total", "counter", "SDA requests behind amplifier_mean.",
                   [("", self.amplifier_count)])
            mean_js = self.js_sum / self.js_count if self.js_count else 0.0
            metric("js_mean", "gauge", "Mean per-token Jensen-Shannon divergence (nats) of the SDA generations.",
                   [("", f"{mean_js:.6g}")])
        for name, (help_text, read) in self._gauges.items():
            metric(name, "gauge", help_text, [("", read())])
        return "\n".join(lines) + "\n"
