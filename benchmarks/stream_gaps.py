"""Time to first byte and the longest silence of streamed, judged requests (issue "A browser UI…").

    python benchmarks/stream_gaps.py [--judge-delay 12] [--runs 5]

Two servers on the default model, one after the other (never beside the tests):
1. the self judge (the default): TTFB and the longest gap between bytes of a judged streaming request;
2. a remote judge that answers only after --judge-delay seconds (a real socket, tests/fault_server.py), with
   `show_judging: false`, so that nothing but keep-alives can fill the judge's silence.
Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from fault_server import FaultServer  # noqa: E402
from server_process import ServerProcess  # noqa: E402


def timed_stream(url: str, body: dict) -> dict:
    """Send one request on a raw socket and time every read: (TTFB, longest gap, total)."""
    target = urlparse(url)
    payload = json.dumps(body).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    with socket.create_connection((target.hostname, target.port), timeout=600) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        arrivals, data = [], b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            arrivals.append(time.perf_counter())
            data += chunk
    gaps = [b - a for a, b in zip([started] + arrivals, arrivals)]
    return {"ttfb_s": round(arrivals[0] - started, 3), "max_gap_s": round(max(gaps[1:] or [0]), 3),
            "total_s": round(arrivals[-1] - started, 3), "keepalives": data.count(b": keep-alive"),
            "done": b"data: [DONE]" in data}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge-delay", type=float, default=12.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    body = {"messages": [{"role": "user", "content": "How can I sleep better?"}], "stream": True,
            "max_tokens": 64}
    results = {}
    with ServerProcess("--parallel", "1") as server:
        runs = [timed_stream(server.url, dict(body, seed=i, sda={"align": "helpfulness"})) for i in range(args.runs)]
        results["self judge"] = runs
    with FaultServer([("delay", args.judge_delay, ("score", 70))]) as judge, \
            ServerProcess("--parallel", "1", "--judge-url", judge.url) as server:
        runs = [timed_stream(server.url, dict(body, seed=i, sda={"align": "helpfulness", "show_judging": False}))
                for i in range(args.runs)]
        results[f"remote judge delayed {args.judge_delay:g} s"] = runs
    for name, runs in results.items():
        for run in runs:
            print(json.dumps({"judge": name, **run}))
        print(f"{name}: TTFB max {max(r['ttfb_s'] for r in runs):.3f} s, longest gap "
              f"{max(r['max_gap_s'] for r in runs):.3f} s, all ended with [DONE]: {all(r['done'] for r in runs)}")


if __name__ == "__main__":
    main()
