"""The load test (benchmarks/serve_load.py) against a real server: 50 concurrent clients, 300 requests, a
fifth of them invalid, some hanging up mid-stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import ServerProcess

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"


@pytest.mark.slow
def test_fifty_clients_three_hundred_requests(model_path):
    with ServerProcess("-m", str(model_path), "--parallel", "4", "--queue", "8", "-c", "4096", "--threads", "2") as s:
        out = subprocess.run([sys.executable, str(SCRIPT), "--url", s.url, "--pid", str(s.pid)], capture_output=True,
                             text=True, timeout=1200)
        print(out.stdout)
        report = json.loads(out.stdout)
        assert out.returncode == 0 and report["ok"], (report, out.stderr[-2000:])
        assert s.stop() == 0
