"""A scripted OpenAI-compatible endpoint on 127.0.0.1 for fault injection (a real socket, real HTTP).

Each request to /v1/chat/completions takes the next scripted behaviour (the last one repeats):
("json", obj) | ("raw", bytes) | ("stream", bytes) | ("status", code, headers) | ("delay", seconds, then_behaviour)
| ("score", n). "raw" sends a Content-Length; "stream" sends none and writes the body in 64 KiB pieces, ending
it by closing the connection (HTTP/1.0), so a client cannot know its size in advance.
Requests (headers, raw and JSON bodies) are recorded for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


class FaultServer:
    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        self.streamed = 0  # bytes of "stream" bodies written so far
        self.streams_ended = 0  # "stream" bodies finished or cut off by the client
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                        "json": parsed})
                behaviour = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                self.respond(behaviour)

            def respond(self, behaviour):
                kind = behaviour[0]
                if kind == "delay":
                    time.sleep(behaviour[1])
                    return self.respond(behaviour[2])
                if kind == "score":
                    return self.respond(("json", completion(json.dumps({"score": behaviour[1]}))))
                if kind == "stream":
                    return self.stream(behaviour[1])
                if kind == "status":
                    payload, status, headers = b'{"error": "injected"}', behaviour[1], behaviour[2] if len(behaviour) > 2 else {}
                elif kind == "json":
                    payload, status, headers = json.dumps(behaviour[1]).encode(), 200, {}
                else:  # raw
                    payload, status, headers = behaviour[1], 200, {}
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def stream(self, payload: bytes):
                self.close_connection = True
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for start in range(0, len(payload), 1 << 16):
                        piece = payload[start:start + (1 << 16)]
                        self.wfile.write(piece)
                        server.streamed += len(piece)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading
                finally:
                    server.streams_ended += 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
