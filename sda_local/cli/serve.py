"""``sda-local serve``: the OpenAI-compatible server."""

from __future__ import annotations

import re

import click

from ..engine.layout import STREAM_MODES
from ..errors import InputError
from .common import (judge_options, kv_options, kv_settings, main, offline_option, remote_judge_options,
                     repack_option, exact_option, warn)

_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (a non-loopback one "
              "without --api-key gets a warning).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--parallel", "-np", "parallel", default=4, show_default=True, type=click.IntRange(1, 128),
              help="Slots: requests decoded together in one batch; more wait in the queue.")
@click.option("--ctx-size", "-c", "ctx_size", default=None, type=click.IntRange(16),
              help="Total context, split across the slots as llama-server does (default: 4096 per slot).")
@click.option("--queue", "queue_size", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; past it the server answers 429 with Retry-After.")
@click.option("--api-key", envvar="SDA_LOCAL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also $SDA_LOCAL_API_KEY).")
@click.option("--max-body", default=1 << 20, show_default=True, type=click.IntRange(1024),
              help="Largest request body in bytes (413 beyond).")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a request has for its headers (from the connection or the previous answer); "
              "past it: 408 and the connection closed (slow clients).")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a request has for its body once its headers are in.")
@click.option("--keep-alive-timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--sse-keepalive", default=2.0, show_default=True, type=click.FloatRange(0.05, 60),
              help="Seconds of silence after which a stream sends an SSE comment (judging a first answer can take "
              "longer than a proxy or front end waits for a byte).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages of ORIGIN (e.g. http://localhost:3000) call the API from a browser; repeatable. "
              "Off by default.")
@click.option("--alias", default=None, help="Model id in /v1/models and responses (default: the GGUF file name).")
@judge_options
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name (default: the default model).")
@click.option("--threads", "n_threads", default=None, type=click.IntRange(1), help="CPU threads (default: all).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int,
              help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal.")
@click.option("--streams", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
              help="batched: one context, every stream a sequence; contexts: two contexts on the same weights.")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
@kv_options[0]
@kv_options[1]
@kv_options[2]
@repack_option
@exact_option
@offline_option
def serve(host, port, parallel, ctx_size, queue_size, api_key, max_body, header_timeout, body_timeout,
          keep_alive_timeout, sse_keepalive, cors_origins, alias, judge, judge_url, amplifier_map,
          model, n_threads, n_gpu_layers, streams, verbose):
    """OpenAI-compatible server and its chat page: /, /v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics.

    A request steers with a top-level "sda" object ({"align": ..., "strength": ...}; the openai SDK sends
    it with extra_body); without one it is plain generation. Requests share one batched decode.
    """
    from .. import models as catalogue
    from ..server import is_loopback, run_server

    if amplifier_map != "sigmoid":
        raise InputError("--amplifier-map is chosen per request in serve (sda.amplifier_map)")
    for origin in cors_origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise InputError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] "
                             "(no path), e.g. http://localhost:3000, or * for any")
    n_ctx = (ctx_size // parallel) if ctx_size is not None else 4096
    if n_ctx < 16:
        raise InputError(f"--ctx-size {ctx_size} leaves {n_ctx} tokens per slot; give at least {16 * parallel}")
    if not is_loopback(host) and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this address can use the model")
    model_path = catalogue.resolve(model)  # fetch (or fail) before the port opens
    judge_spec = (judge, judge_url)
    judge_options = remote_judge_options()
    kv = kv_settings()

    def load():
        from ..engine import SDAEngine
        from ..judging import make_judge

        engine = SDAEngine(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                           streams=streams, parallel=parallel, verbose=verbose, **kv)
        for notice in engine.notices:
            click.echo(f"note: {notice}", err=True)
        click.echo(f"sda-local: {engine.describe_memory()}", err=True)
        try:
            return engine, make_judge(judge_spec[0], engine, url=judge_spec[1], **judge_options)
        except BaseException:
            engine.close()
            raise

    run_server(load, model_id=alias or _model_id(model, model_path), host=host, port=port, api_key=api_key,
               queue_size=queue_size, max_body=max_body, header_timeout=header_timeout,
               body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout, sse_keepalive=sse_keepalive,
               cors_origins=cors_origins,
               on_listening=lambda url: click.echo(f"sda-local: listening on {url} ({parallel} slots of "
                                                   f"{n_ctx} tokens)", err=True))


def _model_id(spec, path) -> str:
    """What /v1/models shows: the name the user gave (ollama:NAME:TAG, a pulled name), else the file name."""
    if spec and not str(spec).lower().endswith(".gguf") and "/" not in str(spec).split(":", 1)[0]:
        return str(spec)
    return path.name

