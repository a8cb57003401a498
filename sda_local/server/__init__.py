"""``sda-local serve``: an OpenAI-compatible HTTP server with per-request SDA (needs ``sda-local[server]``).

    schemas.py   the request bodies (OpenAI's fields and the ``sda`` object)
    service.py   requests -> prompts -> jobs in the engine's scheduler, and the SDA pipeline's judge
    app.py       FastAPI routes, errors in OpenAI's format, server-sent events
    metrics.py   Prometheus counters for /metrics (prometheus_client)
    protocol.py  uvicorn's HTTP protocol with deadlines for slow clients
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import sys
import threading
from typing import Callable, Optional, Sequence

from ..errors import InputError

DEFAULT_PORT = 8080
# Slow clients (protocol.py): seconds for a request's headers, for its body, and for an idle keep-alive
# connection (uvicorn's own default for the last).
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _import_stack():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"the server needs its extra: pip install 'sda-local[server]' ({exc.name} is missing)") from None
    return uvicorn


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM/SIGINT end it with exit status 0: uvicorn raises the signal
        again once it has shut down, so the process would die of it."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def run_server(load: Callable[[], tuple], *, model_id: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
               api_key: Optional[str] = None, queue_size: int = 16, max_body: int = 1 << 20,
               header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, sse_keepalive: Optional[float] = None,
               cors_origins: Sequence[str] = (),
               on_listening: Callable[[str], None] = lambda url: None) -> None:
    """Serve until SIGTERM/SIGINT. ``load()`` -> (engine, judge) runs in the background while /health
    answers 503. ``port`` 0 picks a free port; ``on_listening`` gets the URL once the socket is bound.
    Deadlines (seconds): a request's headers, its body, and an idle keep-alive connection (protocol.py).
    ``sse_keepalive``: seconds of silence after which a stream sends an SSE comment (None: app.py's default);
    ``cors_origins``: origins whose pages may call the API (none by default)."""
    uvicorn = _import_stack()
    from .app import ServerConfig, create_app

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    config = ServerConfig(model_id=model_id, api_key=api_key, max_body=max_body, queue_size=queue_size,
                          cors_origins=tuple(cors_origins))
    if sse_keepalive is not None:
        config.keepalive = sse_keepalive
    app = create_app(config, load)
    from .protocol import deadline_protocol

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on", http=deadline_protocol(header_timeout, body_timeout),
                            timeout_keep_alive=keep_alive_timeout)
    server = _server_class(uvicorn)(config)
    on_listening(f"http://{shown}:{bound}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
