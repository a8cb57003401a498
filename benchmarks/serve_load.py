"""Load test of ``sda-local serve`` over loopback: many concurrent clients, a share of invalid requests, and
clients that hang up mid-stream.

Every valid request must be answered (200, or 429 and then 200 on retry after Retry-After); every invalid
one must get a 4xx JSON error in OpenAI's format; the server must stay healthy, with RSS after within 50 MB
of RSS before (both after a warm-up) and no leaked file descriptors.

    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --pid PID [--clients 50] [--requests 300]

Prints one JSON report and exits 1 if any check fails. ``tests/test_serve_load.py`` runs it against a real
server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import List, Optional

import requests

CHAT = "/v1/chat/completions"
QUESTIONS = ["Name a fruit.", "How do I boil an egg?", "What is the capital of France?", "Give me a tip for sleep.",
             "Why is the sky blue?", "Name three colours."]


def valid_request(rng: random.Random) -> dict:
    body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": rng.randint(4, 16),
            "seed": rng.randint(0, 1000)}
    kind = rng.random()
    if kind < 0.35:
        body["sda"] = {"align": rng.choice(["helpfulness", "honesty", "Answer in one short sentence."]),
                       "strength": rng.choice([0.0, 0.5, 1.0])}
    elif kind < 0.5:
        body["sda"] = {"align": "Answer without commas."}  # the full pipeline: first answer, self judge, SDA
    body["stream"] = rng.random() < 0.5
    return body


INVALID = [  # (what, data bytes, content type, expected status)
    ("malformed JSON", b'{"messages": [', "application/json", 400),
    ("wrong content type", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(), "text/plain", 415),
    ("non-UTF-8 body", b'{"messages": [{"role": "user", "content": "\xff"}]}', "application/json", 400),
    ("body over the limit", b'{"messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}',
     "application/json", 413),
    ("unknown sda key", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                    "sda": {"align": "honesty", "amplify": 2}}).encode(), "application/json", 400),
    ("negative strength", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                      "sda": {"align": "honesty", "strength": -1}}).encode(), "application/json", 400),
    ("max_tokens 10^9", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 10**9}).encode(), "application/json", 400),
    ("n = 3", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "n": 3}).encode(), "application/json", 400),
]


def rss_mb(pid: int) -> float:
    if not os.path.exists(f"/proc/{pid}/status"):  # macOS: ps reports KiB too
        return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(pid)])) / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    if not os.path.isdir(f"/proc/{pid}/fd"):  # macOS
        return len(subprocess.check_output(["lsof", "-p", str(pid)]).splitlines()) - 1
    return len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.failures: List[str] = []

    def add(self, key: str, failure: Optional[str] = None):
        with self.lock:
            self.counts[key] += 1
            if failure:
                self.failures.append(failure)


# A client retries a 429 after Retry-After plus a random jitter, as the openai SDK does: 50 clients that all
# retry after exactly 1 s stay in step, and one can lose every round for as long as the run lasts (on a slow
# machine longer than any fixed number of rounds). The budget is wall time, far beyond a healthy run.
RETRY_BUDGET_S = 900.0


def send_valid(url: str, body: dict, tally: Tally, hang_up: bool) -> None:
    jitter = random.Random()  # each client its own: identical bodies must not retry in step either
    give_up = time.monotonic() + RETRY_BUDGET_S
    while time.monotonic() < give_up:
        try:
            response = requests.post(url + CHAT, json=body, stream=body["stream"], timeout=300)
        except requests.RequestException as exc:
            tally.add("valid_error", f"valid request raised {exc!r}")
            return
        with response:
            if response.status_code == 429:
                tally.add("429")
                time.sleep(float(response.headers.get("Retry-After", "1")) + jitter.uniform(0.0, 1.0))
                continue
            if response.status_code != 200:
                tally.add("valid_error", f"valid request got {response.status_code}: {response.text[:200]}")
                return
            if not body["stream"]:
                data = response.json()
                if not isinstance(data["choices"][0]["message"]["content"], str):
                    tally.add("valid_error", "no content")
                    return
                tally.add("valid_ok")
                return
            lines = response.iter_lines()
            if hang_up:  # read a little, then go away mid-stream
                for _ in range(2):
                    next(lines, None)
                tally.add("hung_up")
                return
            events = [line for line in lines if line.startswith(b"data: ")]
            if not events or events[-1] != b"data: [DONE]" or any(b'"error"' in e for e in events):
                tally.add("valid_error", f"bad stream ending {events[-2:] if events else events}")
                return
            tally.add("valid_ok")
            return
    tally.add("valid_error", f"still 429 after {RETRY_BUDGET_S:.0f} s of retries")


def send_invalid(url: str, case: tuple, tally: Tally) -> None:
    what, data, content_type, status = case
    try:
        response = requests.post(url + CHAT, data=data, headers={"Content-Type": content_type}, timeout=120)
    except requests.RequestException as exc:
        tally.add("invalid_error", f"{what}: raised {exc!r}")
        return
    if response.status_code == 429:  # checked before the body is parsed? no: errors come first
        tally.add("invalid_error", f"{what}: got 429 instead of {status}")
        return
    try:
        error = response.json()["error"]
        ok = response.status_code == status and error["message"] and "type" in error and "code" in error
    except (ValueError, KeyError, TypeError):
        ok = False
    tally.add("invalid_ok" if ok else "invalid_error",
              None if ok else f"{what}: got {response.status_code} {response.text[:200]}")


def run(url: str, pid: int, clients: int, total: int, invalid_share: float, hang_up_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    health = requests.get(url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    for body in [valid_request(rng) for _ in range(4)]:  # warm-up: every path once
        body["stream"] = False
        requests.post(url + CHAT, json=body, timeout=300)
    rss_before, fds_before = rss_mb(pid), open_fds(pid)
    plan = []
    for i in range(total):
        if rng.random() < invalid_share:
            plan.append(("invalid", INVALID[i % len(INVALID)]))
        else:
            body = valid_request(rng)
            plan.append(("valid", body, body["stream"] and rng.random() < hang_up_share))
    tally = Tally()
    queue = list(enumerate(plan))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                _, item = queue.pop()
            if item[0] == "invalid":
                send_invalid(url, item[1], tally)
            else:
                send_valid(url, item[1], tally, item[2])

    started = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    time.sleep(2)  # let hung-up streams be noticed and their slots freed
    healthy = requests.get(url + "/health", timeout=10).status_code == 200
    after = requests.post(url + CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                          timeout=120).status_code
    rss_after, fds_after = rss_mb(pid), open_fds(pid)
    n_invalid = sum(1 for p in plan if p[0] == "invalid")
    n_hang = sum(1 for p in plan if p[0] == "valid" and p[2])
    report = {
        "clients": clients, "requests": total, "invalid": n_invalid, "hang_ups": n_hang,
        "seconds": round(elapsed, 1), "counts": dict(tally.counts), "failures": tally.failures[:20],
        "healthy_after": healthy, "request_after_status": after,
        "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1), "fds_before": fds_before, "fds_after": fds_after,
    }
    report["ok"] = (not tally.failures and tally.counts["valid_ok"] == total - n_invalid - n_hang
                    and tally.counts["invalid_ok"] == n_invalid and healthy and after == 200
                    and rss_after - rss_before <= 50 and fds_after <= fds_before)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (for RSS and fds)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--invalid-share", type=float, default=0.2)
    parser.add_argument("--hang-up-share", type=float, default=0.15, help="of the valid streaming requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = run(args.url, args.pid, args.clients, args.requests, args.invalid_share, args.hang_up_share, args.seed)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
