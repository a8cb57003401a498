"""Two `sda-local serve` replicas behind a real nginx (Debian's package) on loopback ports, configured as the
README says: consistent hashing on a conversation header keeps a conversation on one replica (its second
turn finds its first in that replica's cache), and proxy_next_upstream carries requests over to the other
replica when one is killed, so that no valid request is lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from server_process import ServerProcess

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
README = Path(__file__).resolve().parents[1] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_upstream_config() -> str:
    """The nginx configuration block of the README (between its markers), so the test runs what users copy."""
    text = README.read_text()
    start = text.index("# --- nginx: sda-local replicas ---")
    end = text.index("# --- end ---", start)
    return text[start:end]


def nginx_conf(tmp: Path, listen: int, replicas) -> str:
    block = readme_upstream_config()
    block = block.replace("server 127.0.0.1:8081", f"server 127.0.0.1:{replicas[0]}")
    block = block.replace("server 127.0.0.1:8082", f"server 127.0.0.1:{replicas[1]}")
    block = block.replace("listen 127.0.0.1:8080", f"listen 127.0.0.1:{listen}")
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n    access_log {tmp}/access.log;\n{temp}{block}}}\n")


def chat_requests(replica) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(replica.url + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "sda_requests_total" and s.labels.get("endpoint") == "/v1/chat/completions")


@pytest.mark.slow
def test_two_replicas_behind_nginx(tmp_path):
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing (.ci/run installs Debian's package)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    replicas = [ServerProcess("--parallel", "1", "-c", "2048", "--threads", "1") for _ in range(2)]
    proxy = None
    try:
        ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
        listen = free_port()
        (tmp_path / "nginx.conf").write_text(nginx_conf(tmp_path, listen, ports))
        proxy = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{listen}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("nginx did not come up: " + (tmp_path / "error.log").read_text())

        def chat(conversation: str, messages, max_tokens=8):
            r = requests.post(url + "/v1/chat/completions", timeout=300, headers={"X-Conversation-Id": conversation},
                              json={"messages": messages, "max_tokens": max_tokens, "seed": 1})
            return r

        sent = answered = hits = 0
        turn1_tokens = {}
        conversations = [f"conv-{i}" for i in range(8)]
        for conv in conversations:
            messages = [{"role": "system", "content": f"You are assistant number {conv}."},
                        {"role": "user", "content": "Name a colour."}]
            first = chat(conv, messages)
            sent += 1
            answered += first.status_code == 200
            reply = first.json()["choices"][0]["message"]["content"]
            turn1_tokens[conv] = first.json()["usage"]["prompt_tokens"]
            second = chat(conv, messages + [{"role": "assistant", "content": reply},
                                            {"role": "user", "content": "And another one?"}])
            sent += 1
            answered += second.status_code == 200
            cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            # The whole first turn was in the cache: the conversation came back to its replica.
            hits += cached >= turn1_tokens[conv]
        assert answered == sent and hits == len(conversations), (answered, sent, hits)
        spread = [chat_requests(r) for r in replicas]
        assert all(n > 0 for n in spread) and sum(spread) == sent, spread  # both replicas had conversations

        # Kill one replica outright: every request still gets its answer, the dead one's carried over.
        replicas[0].stop(signal.SIGKILL)
        carried_before = _upstream_errors(tmp_path)
        after = 0
        for conv in conversations:
            r = chat(conv, [{"role": "user", "content": "Name a fruit."}], max_tokens=4)
            sent += 1
            after += 1
            answered += r.status_code == 200
            assert r.status_code == 200, r.text
        carried = _upstream_errors(tmp_path) - carried_before
        assert answered == sent
        assert carried >= 1  # nginx met the dead replica and went on to the live one
        print(f"\nnginx: {sent} requests sent, {answered} answered; second turns with their first turn cached: "
              f"{hits}/{len(conversations)}; after the kill: {after} requests, {carried} carried over")
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGQUIT)
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        for r in replicas:
            r.stop()


def _upstream_errors(tmp: Path) -> int:
    """Connections nginx could not make to an upstream (each one a request it carried to the next)."""
    log = tmp / "error.log"
    if not log.exists():
        return 0
    return sum("connect() failed" in line for line in log.read_text().splitlines())
