"""``GET /metrics`` through ``prometheus_client``, one registry per server (two servers in one process, as in
the tests, keep their own counts).

Requests are labelled by route template, never by the raw path: a path the server does not serve counts as
``endpoint="other"``, so a client can neither add label series nor write into the exposition (the library
escapes label values anyway).
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

# Every route of app.py (none has path parameters, so a template is its path).
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


class _Mean:
    """A running mean, read by a gauge at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        with self._lock:
            self.total += value
            self.count += 1

    def value(self) -> float:
        with self._lock:
            return self.total / self.count if self.count else 0.0


class Metrics:
    def __init__(self, gauges: Dict[str, Tuple[str, Callable[[], float]]]):
        """``gauges``: name -> (help, read it now), exported as ``sda_<name>``."""
        self.registry = registry = CollectorRegistry()
        self._requests = Counter("sda_requests", "HTTP requests answered, by route and status.",
                                 ["endpoint", "status"], registry=registry)
        self._generations = Counter("sda_generations", "Generations finished (an SDA request with a judge has two).",
                                    registry=registry)
        self._prompt_tokens = Counter("sda_prompt_tokens", "Prompt tokens over every stream.", registry=registry)
        self._cached_tokens = Counter("sda_prompt_tokens_cached", "Prompt tokens reused from a slot's cache.",
                                      registry=registry)
        self._generated_tokens = Counter("sda_generated_tokens", "Tokens generated.", registry=registry)
        self._cancelled = Counter("sda_generations_cancelled", "Generations stopped because their client went away "
                                  "(a stop button, a closed tab) or the server stopped.", registry=registry)
        self._amplifier = _Mean()
        self._js = _Mean()
        Gauge("sda_amplifier_mean", "Mean amplifier a of the SDA requests so far.",
              registry=registry).set_function(self._amplifier.value)
        self._amplifier_count = Counter("sda_amplifier_observations", "SDA requests behind amplifier_mean.",
                                        registry=registry)
        Gauge("sda_js_mean", "Mean per-token Jensen-Shannon divergence (nats) of the SDA generations.",
              registry=registry).set_function(self._js.value)
        for name, (help_text, read) in gauges.items():
            Gauge(f"sda_{name}", help_text, registry=registry).set_function(read)

    def observe_request(self, path: str, status: int) -> None:
        self._requests.labels(route_of(path), str(status)).inc()

    def observe_generation(self, stats) -> None:
        self._generations.inc()
        self._prompt_tokens.inc(stats.prompt_tokens_with + (stats.prompt_tokens_without or 0))
        self._cached_tokens.inc(stats.cached_tokens)
        self._generated_tokens.inc(stats.generated_tokens)
        if stats.mean_js is not None:
            self._js.add(stats.mean_js)

    def observe_cancelled(self) -> None:
        self._cancelled.inc()

    def observe_amplifier(self, a: float) -> None:
        self._amplifier.add(a)
        self._amplifier_count.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
