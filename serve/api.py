"""What every route shares: JSON errors, raw-body reading under caps and deadlines, OpenAPI bits."""
from __future__ import annotations

from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from encrypted import EncryptedError, InvalidCiphertext, InvalidKeys, ParameterMismatch

from .protocol import OCTET_STREAM


# --- errors -----------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as JSON ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def input_error(exc: ValueError) -> ApiError:
    """Bad bytes from a client: 422 when well-formed but made for other parameters, else 400."""
    if isinstance(exc, ParameterMismatch):
        return ApiError(422, "parameter_mismatch", str(exc))
    if isinstance(exc, InvalidKeys):
        return ApiError(400, "invalid_keys", str(exc))
    if isinstance(exc, InvalidCiphertext):
        return ApiError(400, "invalid_ciphertext", str(exc))
    return ApiError(400, "invalid_input", str(exc) if isinstance(exc, EncryptedError) else
                    "the request body could not be used; send the bytes that the xsilo client produces")



# --- documentation ------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": ErrorBody, "description": "Unknown session: open a new one"},
    408: {"model": ErrorBody, "description": "Headers or body arrived too slowly"},
    413: {"model": ErrorBody, "description": "Body over this route's cap"},
    503: {"model": ErrorBody, "description": "Too many requests waiting for HE workers, or too many connections; retry"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed bytes, or secret-key material"},
    422: {"model": ErrorBody, "description": "Well-formed bytes made for other CKKS parameters or layout"},
}


def raw_body(description: str) -> dict[str, Any]:
    """OpenAPI for a raw octet-stream request body (FastAPI cannot infer it: the route reads the stream)."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}}


OCTET_REPLY: dict[str, Any] = {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}


# --- bodies and keys ----------------------------------------------------------------------------------

async def read_body(request: Request, limit: int, what: str, timeout_s: float) -> bytes:
    """The raw body, refused with 413 past `limit` (by Content-Length first, then while streaming) and with 408
    when it has not all arrived within `timeout_s`. Both close the connection: its unread rest is dropped."""
    too_large = ApiError(413, "body_too_large", f"{what} may be at most {limit} bytes on this route; send the "
                                                f"bytes the xsilo client produces for this server's layout",
                         {"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared[:32]!r} is not a byte count")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", f"the client closed the connection while sending {what}") from None
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"{what} did not arrive within {timeout_s:g} s of the headers "
                                            f"({len(body)} bytes came); send the body at once",
                       {"Connection": "close"}) from None
    if not body:
        raise ApiError(400, "empty_body", f"the request has no body; send {what} as raw {OCTET_STREAM} bytes")
    return bytes(body)
