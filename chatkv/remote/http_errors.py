"""What to tell the user when the server says no, cannot be reached or goes quiet: one sentence, with what to do."""

from __future__ import annotations

import json

import httpx


def server_message(body: bytes) -> str:
    """The server's own explanation from an OpenAI-style error body (``{"error": {"message": ...}}``), if any."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:200]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    if isinstance(error, str):
        return error[:300]
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"][:300]
    return ""


def describe_status(status: int, body: bytes, model: str, key_env: str, retry_after: str | None = None) -> str:
    """A failed response as a message for the tab. ``status`` is the HTTP status code."""
    detail = server_message(body)
    said = f" (the server said: {detail})" if detail else ""
    if status == 401:
        return f"The server refused the API key (401){said}. Put the right key in ${key_env} (or name another variable with --api-key-env)."
    if status == 403:
        return f"The server does not allow this request (403){said}. Check the API key's permissions."
    if status == 404:
        return (f"The server has no model {model!r} (404){said}. "
                "Pick one of its models from the command palette (Ctrl+P, 'Model:') or with --model.")
    if status == 429:
        wait = f" It asks to wait {retry_after} s." if retry_after else ""
        return f"The server is rate limiting (429){said}.{wait} Send again in a moment."
    if status >= 500:
        return f"The server failed ({status}){said}. Send again to retry; if it persists, check the server's log."
    return f"The server rejected the request ({status}){said}."


def describe_transport_error(exc: httpx.TransportError, url: str, read_timeout_s: float) -> str:
    """A connection that failed, dropped or went quiet, as a message for the tab."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"The server at {url} did not accept the connection in time. Is it running? Send again to retry."
    if isinstance(exc, httpx.ConnectError):
        return f"Cannot reach the server at {url} ({exc}). Is it running? Send again to retry."
    if isinstance(exc, httpx.ReadTimeout):
        return (f"The server at {url} sent nothing for {read_timeout_s:g} s, so chatkv gave up on this reply. "
                "Send again to retry ([backend] read_timeout_s sets the limit).")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return f"The connection to {url} broke in the middle of the reply ({exc or type(exc).__name__}). Send again to retry."
    return f"The request to {url} failed ({type(exc).__name__}: {exc}). Send again to retry."
