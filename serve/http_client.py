"""What the Python clients share: the HTTP connection to one xsilo server, its JSON errors, and byte counts."""
from __future__ import annotations

from typing import Any, Sequence

import httpx

from .protocol import OCTET_STREAM, SERVER_TIMING_HEADER

MAX_RESPONSE_BYTES = 64 << 20  # any answer of an xsilo server is far smaller; a bigger one is refused unread


class ServeError(Exception):
    """A client-side failure: the server is unreachable, refused a request, or the client setup is wrong."""


class ServerReplyError(ServeError):
    """The server answered with an error ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"server answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def reply_error(response: httpx.Response) -> ServerReplyError:
    """The server's JSON error, or a plain HTTP one when the body is not xsilo's error shape."""
    try:
        error = response.json()["error"]
        return ServerReplyError(response.status_code, str(error["code"])[:100], str(error["message"])[:2000])
    except (ValueError, KeyError, TypeError):
        return ServerReplyError(response.status_code, "http_error",
                                f"HTTP {response.status_code} {response.reason_phrase} from {response.url}")


def server_ms(response: httpx.Response) -> float:
    """The server's HE milliseconds from `Server-Timing: he;dur=MS` (0 when absent or malformed)."""
    timing = response.headers.get(SERVER_TIMING_HEADER, "")
    if "dur=" not in timing:
        return 0.0
    try:
        value = float(timing.split("dur=")[1].split(",")[0].split(";")[0])
    except ValueError:
        return 0.0
    return value if value >= 0 and value < 1e9 else 0.0


class Connection:
    """httpx to one server (or a load balancer in front of replicas), with the API key and byte counts."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        # bytes: a non-ASCII key travels as its UTF-8 bytes, which is what the server compares
        headers = {"Authorization": b"Bearer " + api_key.encode("utf-8")} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self.bytes_sent = 0
        self.bytes_received = 0

    def request(self, method: str, path: str, *, content: bytes | None = None, params: dict[str, Any] | None = None,
                expect: Sequence[int] = (200,), max_bytes: int = MAX_RESPONSE_BYTES) -> httpx.Response:
        """One request; the answer is read up to `max_bytes` (the server is the other party: a longer answer is
        refused while it streams). Raises ServerReplyError for a status not in `expect`, ServeError otherwise."""
        headers = {"Content-Type": OCTET_STREAM} if content is not None else None
        body = bytearray()
        try:
            with self.http.stream(method, path, content=content, headers=headers, params=params) as streamed:
                for block in streamed.iter_bytes():
                    body += block
                    if len(body) > max_bytes:
                        raise ServeError(f"{method} {path} on {self.url} answered more than {max_bytes} bytes, far "
                                         "more than this route sends; refusing it (is it an xsilo server?)")
        except httpx.TransportError as exc:
            raise ServeError(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc}); "
                             "is `xsilo serve` running there?") from None
        self.bytes_sent += len(content or b"")
        self.bytes_received += len(body)
        kept = [(k, v) for k, v in streamed.headers.multi_items()
                if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        response = httpx.Response(streamed.status_code, headers=kept, content=bytes(body), request=streamed.request)
        if response.status_code not in expect:
            raise reply_error(response)
        return response

    def json(self, method: str, path: str, **options: Any) -> Any:
        response = self.request(method, path, **options)
        try:
            return response.json()
        except ValueError:
            raise ServeError(f"{method} {path} on {self.url} did not answer JSON; is it an xsilo server?") from None

    def close(self) -> None:
        self.http.close()
