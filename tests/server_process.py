"""A real ``sda-local serve`` process on 127.0.0.1 for the tests: started as a user would, on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

import requests


def _test_options(args) -> List[str]:
    """conftest's SDA_LOCAL_TEST_MODEL (where the test gives no model) and SDA_LOCAL_TEST_NGL, as options."""
    extra = []
    model = os.environ.get("SDA_LOCAL_TEST_MODEL")
    if model and not {"-m", "--model"} & set(args):
        extra += ["-m", model]
    ngl = int(os.environ.get("SDA_LOCAL_TEST_NGL") or 0)
    if ngl and "--n-gpu-layers" not in args:
        extra += ["--n-gpu-layers", str(ngl)]
    return extra


class ServerProcess:
    def __init__(self, *args: str, env: Optional[dict] = None, ready_timeout: float = 120.0):
        exe = os.path.join(os.path.dirname(sys.executable), "sda-local")
        args = (*args, *_test_options(args))
        self.proc = subprocess.Popen([exe, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})), text=True)
        self.stderr_lines: List[str] = []
        self.url = None
        listening = threading.Event()

        def read_stderr():
            for line in self.proc.stderr:
                self.stderr_lines.append(line)
                found = re.search(r"listening on (http://\S+)", line)
                if found:
                    self.url = found.group(1)
                    listening.set()
            listening.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        if not listening.wait(ready_timeout) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start: " + "".join(self.stderr_lines))
        self.base = self.url + "/v1"
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server never became healthy: " + "".join(self.stderr_lines))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def openai_client(server: ServerProcess, timeout: float = 120):
    """The openai SDK pointed at a test server (no retries: a test sees the server's first answer)."""
    import openai

    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=timeout)


def metric(server: ServerProcess, name: str) -> float:
    """One sample of the server's /metrics now, by its full name (e.g. sda_slots_busy)."""
    for line in requests.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")
