"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for slow clients.

uvicorn closes a keep-alive connection that stays idle, but any byte restarts the wait, and a connection
that has sent nothing has no timer at all: 50 sockets sending one byte a second hold 50 connections for
ever (slowloris). Here each request must bring its headers within ``header_timeout`` seconds (counted from
the connection, or from the end of the previous response) and its body within ``body_timeout`` more. A
connection that misses a deadline is closed: with a 408 when part of a request had come and nothing of its
answer was sent, silently when it had sent nothing (an idle keep-alive connection: a client reusing it at
that moment sees a closed connection, which it retries, not a 408 it would take for its answer).
"""

from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def deadline_protocol(header_timeout: float, body_timeout: float):
    """An H11Protocol class with these deadlines (uvicorn.Config(http=...) takes the class)."""

    class DeadlineH11Protocol(H11Protocol):
        _deadline: Optional[asyncio.TimerHandle] = None
        _phase: Optional[str] = None  # "headers" or "body": what the running deadline waits for
        _heard = False  # bytes came since the deadline was armed

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers")

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._heard = True
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._follow()  # a pipelined request may be under way already

        def _follow(self) -> None:
            """Set the deadline that the client's side of the connection is now under."""
            state = self.conn.their_state
            if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self._arm("headers")
            elif state is h11.SEND_BODY:
                self._arm("body")
            else:  # the request is in (DONE), or the connection is ending
                self._disarm()

        def _arm(self, phase: str) -> None:
            if self._phase == phase:
                return  # a running deadline is not restarted by more bytes
            self._disarm()
            self._phase, self._heard = phase, False
            timeout = header_timeout if phase == "headers" else body_timeout
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _expire(self) -> None:
            self._deadline, phase = None, self._phase
            self._phase = None
            if self.transport.is_closing():
                return
            if (phase == "headers" and self._heard) or (phase == "body" and self.cycle is not None
                                                         and not self.cycle.response_started):
                body = f"the request's {phase} did not arrive in time\n".encode()
                try:
                    self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                                         b"connection: close\r\ncontent-length: " + str(len(body)).encode()
                                         + b"\r\n\r\n" + body)
                except Exception:  # the peer is gone already: closing is all there is to do
                    pass
            self.transport.close()

    return DeadlineH11Protocol
