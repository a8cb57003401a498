"""Bring your own model: the real default GGUF served from a local HTTP server (Range support, a connection
dropped mid-file, 404/401/403, a web page), an ollama-style store and an LM Studio-style folder built around
the real file in a temporary directory, and generation with the model resolved each way."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli


class GGUFServer:
    """Serves one file at /org/repo/resolve/main/<name> (Hugging Face's layout) with Range support and the
    sha256 as ETag. ``drop_after``: the first full-file response stops after that many bytes."""

    def __init__(self, path: Path, *, drop_after=None, etag=True, drop_always=False):
        self.drop_always = drop_always
        self.data = path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.name = path.name
        self.drop_after, self.etag = drop_after, etag
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path.endswith("/missing.gguf"):
                    return self._plain(404, b"not found")
                if self.path.endswith("/gated.gguf"):
                    return self._plain(401, b"unauthorized")
                if self.path.endswith("/page.gguf"):
                    body = b"<!doctype html><html><body>Sign in</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(server.data) - start))
                if server.etag:
                    self.send_header("X-Linked-Etag", f'"{server.sha256}"')
                self.end_headers()
                body = server.data[start:]
                if server.drop_after is not None and (not rng or server.drop_always):
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # a dropped connection, mid-file
                    return
                self.wfile.write(body)

            def _plain(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def file_url(self, name=None):
        return f"{self.url}/org/repo/resolve/main/{name or self.name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path):
    """A fresh model cache and empty stores, as environment variables for the CLI."""
    env = {"SDA_LOCAL_CACHE": str(tmp_path / "cache"), "OLLAMA_MODELS": str(tmp_path / "ollama"),
           "SDA_LOCAL_LMSTUDIO_MODELS": str(tmp_path / "lmstudio"), "LLAMA_CACHE": str(tmp_path / "llamacpp")}
    return env


def generate(model, env):
    out = run_cli("generate", "Say hi.", "-m", model, "-n", "4", "--seed", "1", "--json", env=env)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)["text"]


def user_catalogue(env):
    path = Path(env["SDA_LOCAL_CACHE"]) / "user-models.json"
    return json.loads(path.read_text()) if path.exists() else {}


def no_partial_left(env, name):
    folder = Path(env["SDA_LOCAL_CACHE"]) / "user"
    return not (folder / name).exists()


def test_hf_pull_resumes_after_a_drop_verifies_and_registers(model_path, cache):
    server = GGUFServer(model_path, drop_after=10_000_000)
    try:
        env = dict(cache, HF_ENDPOINT=server.url, HF_TOKEN="secret-token")
        out = run_cli("models", "pull", f"hf:org/repo/{model_path.name}", "--name", "mine", env=env)
        assert out.returncode == 0, out.stderr.decode()
        ranges = [r for _, r, _ in server.requests]
        assert ranges[0] is None and ranges[1].startswith("bytes=")  # resumed from what reached the disk
        assert 0 < int(ranges[1][6:-1]) <= 10_000_000 and len(ranges) == 2
        assert all(auth == "Bearer secret-token" for _, _, auth in server.requests)  # to HF_ENDPOINT only
        record = user_catalogue(env)["mine"]
        assert record["sha256"] == server.sha256 and Path(record["path"]).stat().st_size == len(server.data)
        listed = run_cli("models", "list", env=env).stdout.decode()
        assert "mine" in listed
        assert generate("mine", env)
        clash = run_cli("models", "pull", f"hf:org/repo/{model_path.name}", "--name", "mine", env=env)
        assert clash.returncode == 1 and b"exists already" in clash.stderr
    finally:
        server.close()


def test_url_pull_refusals_leave_nothing_behind(model_path, cache, tmp_path):
    server = GGUFServer(model_path, etag=False)
    try:
        env = dict(cache, HF_ENDPOINT=server.url, HF_TOKEN="t")
        cases = [
            (server.file_url("missing.gguf"), [], "not found (HTTP 404)"),
            (server.file_url("gated.gguf"), [], "set HF_TOKEN"),
            (server.file_url("page.gguf"), [], "web page, not a GGUF"),
            (server.file_url(), ["--sha256", "0" * 64], "checksum mismatch"),
            (server.file_url(), ["--sha256", "xyz"], "64 hexadecimal digits"),
            ("ftp://example.com/x.gguf", [], "not a URL"),
        ]
        for url, extra, fragment in cases:
            out = run_cli("models", "pull", url, *extra, env=env)
            err = out.stderr.decode()
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert out.returncode == 1 and len(errors) == 1 and fragment in errors[0], (url, err)
            assert "Traceback" not in err
        assert user_catalogue(env) == {}
        leftovers = list((Path(env["SDA_LOCAL_CACHE"]) / "user").glob("*")) if (Path(env["SDA_LOCAL_CACHE"]) / "user").exists() else []
        assert leftovers == []  # no file under a final name, and no partial after a refusal
    finally:
        server.close()


def test_a_connection_that_keeps_dropping_fails_clearly_and_resumes_later(model_path, cache):
    server = GGUFServer(model_path, drop_after=3_000_000, drop_always=True)
    try:
        out = run_cli("models", "pull", server.file_url(), "--name", "flaky", env=cache)
        err = out.stderr.decode()
        assert out.returncode == 1 and "failed after 5 attempts" in err and "run the same command again" in err
        assert len(server.requests) == 5 and user_catalogue(cache) == {}
        assert not (Path(cache["SDA_LOCAL_CACHE"]) / "user" / model_path.name).exists()
        server.drop_always, server.drop_after = False, None  # the network is back: the same command resumes
        again = run_cli("models", "pull", server.file_url(), "--name", "flaky", env=cache)
        assert again.returncode == 0, again.stderr.decode()
        assert server.requests[5][1].startswith("bytes=") and user_catalogue(cache)["flaky"]["sha256"] == server.sha256
    finally:
        server.close()


def test_a_token_is_never_sent_to_another_host(model_path, cache):
    server = GGUFServer(model_path)
    try:
        env = dict(cache, HF_ENDPOINT="https://huggingface.example", HF_TOKEN="secret-token")
        out = run_cli("models", "pull", server.file_url(), "--name", "plain", env=env)
        assert out.returncode == 0, out.stderr.decode()
        assert all(auth is None for _, _, auth in server.requests)
        assert user_catalogue(env)["plain"]["sha256"] == server.sha256  # the published X-Linked-Etag held
    finally:
        server.close()


def test_ollama_and_lmstudio_stores_are_found_and_used_in_place(model_path, cache, tmp_path):
    env = cache
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    blobs = Path(env["OLLAMA_MODELS"]) / "blobs"
    blobs.mkdir(parents=True)
    os.link(model_path, blobs / f"sha256-{digest}") if _same_fs(model_path, blobs) else \
        (blobs / f"sha256-{digest}").write_bytes(model_path.read_bytes())
    manifest = Path(env["OLLAMA_MODELS"]) / "manifests" / "registry.ollama.ai" / "library" / "smol" / "q4"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    broken = manifest.parent.parent / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                              "digest": "sha256:" + "2" * 64}]}))
    lm = Path(env["SDA_LOCAL_LMSTUDIO_MODELS"]) / "pub" / "repo"
    lm.mkdir(parents=True)
    (lm / "model.gguf").symlink_to(model_path)
    llamacpp = Path(env["LLAMA_CACHE"])
    llamacpp.mkdir()
    (llamacpp / "org_repo_model.gguf").symlink_to(model_path)
    listed = run_cli("models", "list", "--all", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    names = {r["name"]: r for r in json.loads(listed.stdout)}
    assert names["ollama:smol:q4"]["kind"] == "ollama" and names["ollama:smol:q4"]["size_bytes"] > 0
    assert "lmstudio:pub/repo/model.gguf" in names and "ollama:broken:latest" not in names
    assert names[str(llamacpp / "org_repo_model.gguf")]["kind"] == "llama.cpp"
    assert generate("ollama:smol:q4", env) == generate("lmstudio:pub/repo/model.gguf", env) == \
        generate(str(model_path), env)
    missing = run_cli("generate", "hi", "-m", "ollama:broken", "-n", "2", env=env)
    assert missing.returncode == 1 and b"missing blob" in missing.stderr
    unknown = run_cli("generate", "hi", "-m", "ollama:nothing:7b", "-n", "2", env=env)
    assert unknown.returncode == 1 and b"not found" in unknown.stderr


def ollama_store(model_path, env, name="smol", tag="q4"):
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    blobs = Path(env["OLLAMA_MODELS"]) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{digest}").symlink_to(model_path)
    manifest = Path(env["OLLAMA_MODELS"]) / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}"}]}))


def test_the_server_and_the_llm_plugin_take_a_store_model(model_path, cache, tmp_path):
    import requests
    from server_process import ServerProcess

    ollama_store(model_path, cache)
    llm = os.path.join(os.path.dirname(sys.executable), "llm")
    if os.path.exists(llm):
        env = dict(os.environ, **cache, LLM_USER_PATH=str(tmp_path / "llm"))
        reg = subprocess.run([llm, "sda", "register", "ollama:smol:q4", "--name", "smol"], capture_output=True,
                             text=True, env=env, timeout=120)
        assert reg.returncode == 0, reg.stderr
        out = subprocess.run([llm, "-m", "sda-smol", "-o", "max_tokens", "4", "Hi"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
    with ServerProcess("-m", "ollama:smol:q4", "-c", "512", "--parallel", "1", "--threads", "2", env=cache) as server:
        assert requests.get(server.base + "/models").json()["data"][0]["id"] == "ollama:smol:q4"
        r = requests.post(server.base + "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                  "max_tokens": 3}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_list_all_with_no_stores_prints_the_catalogue_only(cache):
    from sda_local import models

    out = run_cli("models", "list", "--all", "--json", env=cache)
    assert out.returncode == 0 and out.stderr == b""
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == [m.name for m in models.catalogue()]
    assert {r["kind"] for r in rows} == {"catalogue"}


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


class RedirectServer:
    """Hugging Face's shape: /resolve/ answers 302 to a CDN (another port, no sha256 there), publishing the
    file's sha256 and size as X-Linked-Etag / X-Linked-Size on the 302 itself."""

    def __init__(self, target_url: str, sha256: str, size: int):
        self.target_url, self.sha256, self.size = target_url, sha256, size
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", server.target_url)
                self.send_header("X-Linked-Etag", f'"{server.sha256}"')
                self.send_header("X-Linked-Size", str(server.size))
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_sha256_published_on_the_redirect_is_checked(model_path, cache):
    cdn = GGUFServer(model_path, etag=False)  # the CDN's answer carries no checksum
    size = len(cdn.data)
    try:
        for published, published_size, fragment in (("0" * 64, size, "checksum mismatch"),
                                                    (cdn.sha256, size + 1, f"the server published {size + 1}"),
                                                    (cdn.sha256, size, None)):
            hub = RedirectServer(cdn.file_url(), published, published_size)
            try:
                out = run_cli("models", "pull", f"hf:org/repo/{model_path.name}", "--name", "hub",
                              env=dict(cache, HF_ENDPOINT=hub.url))
            finally:
                hub.close()
            err = out.stderr.decode()
            if fragment is None:
                assert out.returncode == 0, err
                assert user_catalogue(cache)["hub"]["sha256"] == cdn.sha256
            else:
                assert out.returncode == 1 and fragment in err and "Traceback" not in err, err
                assert user_catalogue(cache) == {} and no_partial_left(cache, model_path.name)
    finally:
        cdn.close()


def test_plain_http_needs_a_sha256(cache):
    # Refused before any connection: the host does not even resolve.
    out = run_cli("models", "pull", "http://models.example.invalid/x.gguf", env=cache)
    err = out.stderr.decode()
    assert out.returncode == 1 and "--sha256" in err and "http://" in err and "Traceback" not in err, err


_ADD_MODELS = """
import sys
from sda_local.models import registry
for i in range(int(sys.argv[2])):
    registry._save_user_model(f"m{sys.argv[1]}-{i}", {"path": "/x", "sha256": "0" * 64, "size": 1, "source": "x"})
"""


def test_catalogue_writes_from_several_processes_keep_every_entry(cache):
    env = dict(os.environ, **cache)
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_MODELS, str(p), "25"], env=env) for p in range(6)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert sorted(user_catalogue(cache)) == sorted(f"m{p}-{i}" for p in range(6) for i in range(25))
    assert not list(Path(cache["SDA_LOCAL_CACHE"]).glob(".user-models.json.*.tmp"))
