"""The headless script language (docs/contracts.md, Headless mode): one JSON object per line, each an operation on the app.

``parse_line`` turns one raw line into a checked ``Op`` or raises ``ScriptError`` with a message that
says what is wrong with it; the runner reports it as an error event and goes on with the next line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

OPS = ("open", "send", "wait", "stats", "snapshot", "close", "quit", "regenerate", "edit", "fork")
NEEDS_TAB = {"open", "send", "close", "regenerate", "edit", "fork"}
NEEDS_MESSAGE = {"edit", "fork"}


class ScriptError(Exception):
    def __init__(self, message: str, tab: str | None = None) -> None:
        super().__init__(message)
        self.tab = tab


@dataclass(frozen=True)
class Op:
    name: str
    line: int
    tab: str | None = None
    text: str | None = None  # send
    system: str | None = None  # open
    title: str | None = None  # open: the tab's display name ("name" in the script)
    max_new_tokens: int | None = None  # send, regenerate, edit
    temperature: float | None = None  # send, regenerate, edit
    message: int | None = None  # edit, fork: a position in the tab's history (system prompt excluded), from 0
    new_tab: str | None = None  # fork


def parse_line(raw: bytes, line: int) -> Op | None:
    """None for a blank line."""
    where = f"line {line}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScriptError(f"{where}: not valid UTF-8 (byte {exc.start}); write the script as UTF-8") from None
    if not text.strip():
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ScriptError(f"{where}: not valid JSON ({exc}); each line must be one JSON object") from None
    if not isinstance(data, dict):
        raise ScriptError(f"{where}: expected a JSON object such as {{\"op\": \"wait\"}}, got {type(data).__name__}")
    tab = data.get("tab")
    shown_tab = tab if isinstance(tab, str) else None
    name = data.get("op")
    if name not in OPS:
        raise ScriptError(f"{where}: unknown op {name!r}; expected one of {', '.join(OPS)}", shown_tab)
    if name in NEEDS_TAB:
        tab = _string(data, "tab", where, required=True, tab=shown_tab)
        if not tab:
            raise ScriptError(f"{where}: \"tab\" must not be empty", shown_tab)
    text = _string(data, "text", where, required=name in ("send", "edit"), tab=shown_tab)
    if name in ("send", "edit") and not text.strip():
        # the TUI sends nothing for blank input; a script gets told instead of a turn on an empty message
        raise ScriptError(f"{where}: \"text\" is empty; a send needs something to say", shown_tab)
    return Op(
        name=name,
        line=line,
        tab=tab if name in NEEDS_TAB else shown_tab,
        text=text,
        system=_string(data, "system", where, tab=shown_tab),
        title=_string(data, "name", where, tab=shown_tab),
        max_new_tokens=_number(data, "max_new_tokens", where, integer=True, minimum=1, tab=shown_tab),
        temperature=_number(data, "temperature", where, integer=False, minimum=0, tab=shown_tab),
        message=_message_position(data, name, where, shown_tab),
        new_tab=_new_tab(data, name, where, shown_tab),
    )


def _message_position(data: dict[str, Any], name: str, where: str, tab: str | None) -> int | None:
    if name not in NEEDS_MESSAGE:
        return None
    if data.get("message") is None:
        raise ScriptError(f"{where}: op {name!r} needs \"message\", the 0-based position of a message in the tab", tab)
    return _number(data, "message", where, integer=True, minimum=0, tab=tab)


def _new_tab(data: dict[str, Any], name: str, where: str, tab: str | None) -> str | None:
    if name != "fork":
        return None
    new_tab = _string(data, "new_tab", where, required=True, tab=tab)
    if not new_tab:
        raise ScriptError(f"{where}: \"new_tab\" must not be empty", tab)
    return new_tab


def _string(data: dict[str, Any], key: str, where: str, required: bool = False, tab: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ScriptError(f"{where}: op {data['op']!r} needs \"{key}\"", tab)
        return None
    if not isinstance(value, str):
        raise ScriptError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}", tab)
    return value


def _number(data: dict[str, Any], key: str, where: str, integer: bool, minimum: float, tab: str | None) -> Any:
    value = data.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ScriptError(f"{where}: \"{key}\" must be {'an integer' if integer else 'a number'}, got {value!r}", tab)
    if value < minimum:
        raise ScriptError(f"{where}: \"{key}\" must be at least {minimum}, got {value!r}", tab)
    return value if integer else float(value)
