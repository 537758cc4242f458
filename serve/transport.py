"""HTTP/1.1 connection limits for uvicorn's h11 protocol: header timeout, connection cap, JSON protocol errors.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and header size
(`h11_max_incomplete_event_size`), but not the time a client may take to send its headers, and its own
errors (malformed HTTP, over the concurrency limit) are plain text. `limited_protocol` returns an
`H11Protocol` subclass that adds, per connection:

* a header deadline: from the connection's start, or the end of its previous response, the next request's
  headers must be complete within `header_timeout_s`, else the server writes a JSON 408 and closes;
* a connection cap: beyond `max_connections` open connections, a request gets a JSON 503 and the connection
  is closed;
* a per-client cap: beyond `max_connections_per_client` open connections from one peer address (the socket's,
  never a forwarded header; a trusted proxy's address is not capped), the same, with its own code;
* JSON bodies for the protocol errors h11 reports (400 malformed request, 431 headers over the cap).

h11 bounds only *incomplete* headers; `HeaderLimit` (ASGI middleware) refuses complete ones over the cap.

Body read timeouts belong to the route that reads the body (`serve.server.read_body`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any, Sequence

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_bytes(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for when h11 cannot frame one."""
    body = error_bytes(code, message)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


def over_capacity_app(code: str, message: str):
    """An ASGI app answering 503 JSON with Retry-After and closing: used for connections beyond a cap."""
    body = error_bytes(code, message)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app


class HeaderLimit:
    """ASGI middleware: 431 JSON for a request whose target and headers exceed `max_header_bytes`."""

    def __init__(self, app: Any, max_header_bytes: int):
        self.app, self.max_header_bytes = app, max_header_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + sum(
                len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
            if size > self.max_header_bytes:
                body = error_bytes("headers_too_large", f"the request target and headers exceed "
                                                        f"{self.max_header_bytes} bytes; send shorter headers")
                await send({"type": "http.response.start", "status": 431,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class AddressSet:
    """Addresses and networks ('10.0.0.5', '10.0.0.0/8', '::1'; '*' for any), as uvicorn's forwarded_allow_ips."""

    def __init__(self, entries: Sequence[str]):
        self.any = "*" in entries
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in entries if entry != "*"]

    def __contains__(self, host: str | None) -> bool:
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.5 on a dual-stack socket is 10.0.0.5
        return any(address in network or (mapped is not None and mapped in network) for network in self.networks)


def check_trusted_proxies(entries: Sequence[str]) -> None:
    """ValueError unless every entry is an IP address, a network or '*'."""
    for entry in entries:
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies holds {entry!r}, which is not an IP address or network (e.g. "
                                 "'[10.0.0.5]' or '[10.0.0.0/8]')") from None


def limited_protocol(header_timeout_s: float, max_connections: int, max_header_bytes: int,
                     max_connections_per_client: int | None = None,
                     trusted_proxies: Sequence[str] = ()) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline, a connection cap, a per-client connection cap (none when
    `max_connections_per_client` is None; addresses in `trusted_proxies` are not capped) and JSON protocol errors.
    Each call counts its own connections: build one per server."""
    if header_timeout_s <= 0 or max_connections < 1 or max_header_bytes < 1024:
        raise ValueError(f"header_timeout_s must be positive, max_connections at least 1 and max_header_bytes at "
                         f"least 1024, got {header_timeout_s}, {max_connections}, {max_header_bytes}")
    if max_connections_per_client is not None and max_connections_per_client < 1:
        raise ValueError(f"max_connections_per_client must be at least 1, got {max_connections_per_client}")
    check_trusted_proxies(trusted_proxies)
    busy = over_capacity_app("too_many_connections", f"the server already holds {max_connections} connections; "
                                                     "retry shortly, and reuse one keep-alive connection per client")
    busy_client = over_capacity_app("too_many_connections_from_client", (
        f"this address already holds {max_connections_per_client} connections to the server; close some, retry "
        "shortly, and reuse one keep-alive connection"))
    exempt = AddressSet(trusted_proxies)
    per_client: dict[str, int] = {}  # open connections per peer address, on this server's event loop only

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._waiting_after: Any = None
            self._peer = self.client[0] if self.client else None
            if self._peer is not None and max_connections_per_client is not None and self._peer not in exempt:
                per_client[self._peer] = per_client.get(self._peer, 0) + 1
            else:
                self._peer = None  # not counted, so never discounted
            if self._peer is not None and per_client[self._peer] > max_connections_per_client:
                self.app = busy_client
            elif len(self.connections) > max_connections:
                self.app = busy
            self._arm_header_timer()

        def _discount(self) -> None:
            """Forget this connection in its address's count (once, whichever close path comes first)."""
            peer, self._peer = getattr(self, "_peer", None), None
            if peer is not None:
                left = per_client.get(peer, 1) - 1
                if left > 0:
                    per_client[peer] = left
                else:
                    per_client.pop(peer, None)

        def _arm_header_timer(self) -> None:
            """Start the deadline for the next request's headers (the current cycle, if any, is finished)."""
            self._cancel_header_timer()
            self._waiting_after = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_arrived(self) -> None:
            if self.cycle is not self._waiting_after:  # h11 parsed a new request: its headers are complete
                self._cancel_header_timer()

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not self._waiting_after:
                return
            self.transport.write(raw_response(
                408, "Request Timeout", "header_timeout",
                f"the request headers did not arrive within {header_timeout_s:g} s; send the whole request at once"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._headers_arrived()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm_header_timer()
            super().on_response_complete()  # may start a pipelined request at once
            self._headers_arrived()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._discount()
            super().connection_lost(exc)

        @staticmethod
        def open_per_client() -> dict[str, int]:
            """A copy of the open-connection counts per peer address (for tests and diagnostics)."""
            return dict(per_client)

        def send_400_response(self, msg: str) -> None:
            received = len(self.conn.trailing_data[0])
            if received > max_header_bytes:
                status, code, message = 431, "headers_too_large", (
                    f"the request target and headers exceed {max_header_bytes} bytes; send shorter headers")
            else:
                status, code, message = 400, "malformed_http", (
                    "the request is not valid HTTP/1.1 (request line, header or body framing); "
                    "send a well-formed request")
            body = error_bytes(code, message)
            try:
                for event in (h11.Response(status_code=status, reason=h11_reason(status),
                                           headers=[(b"content-type", b"application/json"),
                                                    (b"content-length", str(len(body)).encode()),
                                                    (b"connection", b"close")]),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already started: nothing more can be framed
                pass
            self.transport.close()

    return LimitedH11Protocol


def h11_reason(status: int) -> bytes:
    return {400: b"Bad Request", 431: b"Request Header Fields Too Large"}.get(status, b"Error")
