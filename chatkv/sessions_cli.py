"""``chatkv sessions list|show|export|delete``: saved conversations from the shell, without loading the model.

Every problem a user can cause (unknown session, broken file, busy data folder, unwritable output)
ends as one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import orjson
from rich.cells import cell_len, split_graphemes

from chatkv.atomic import write_bytes_atomic
from chatkv.context import Context
from chatkv.conversation import Conversation, Message
from chatkv.lock import DataDirLock, DataDirLocked
from chatkv.store import ConversationStore, StoreError, describe_os_error
from chatkv.visible_text import visible

NAME_COLUMN_WIDTH = 40
ROLE_TITLES = {"system": "System", "user": "You", "assistant": "Assistant"}


def run_sessions_command(context: Context) -> int:
    store = ConversationStore(context.paths)
    handlers: dict[str, Callable[[ConversationStore, object], int]] = {
        "list": _list, "show": _show, "export": _export, "delete": _delete,
    }
    handler = handlers[context.args.sessions_command]
    try:
        return handler(store, context.args)
    except (StoreError, DataDirLocked) as exc:
        _error(str(exc))
        return 1
    except BrokenPipeError:
        # the reader went away (``chatkv sessions list | head``); stop quietly, and keep Python from
        # complaining when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug of ours: say so in one line; CHATKV_DEBUG=1 shows where
        if os.environ.get("CHATKV_DEBUG"):
            traceback.print_exc()
        _error(f"internal error, please report it: {type(exc).__name__}: {exc}")
        return 1


def _error(message: str) -> None:
    # messages quote file names and conversation names, which a hostile file can fill with escape sequences
    print(f"chatkv: {_printable(message, keep_newlines=False)}", file=sys.stderr)


def _load(store: ConversationStore) -> list[Conversation]:
    conversations, messages = store.load_all()
    for message in messages:
        _error(message)
    return conversations


def _list(store: ConversationStore, args) -> int:
    conversations = _load(store)
    if not conversations:
        print(f"No saved conversations in {store.folder}.")
        return 0
    rows = [("ID", "NAME", "TURNS", "LAST UPDATED")]
    for conversation in conversations:
        rows.append((
            conversation.id,
            _shorten(_printable(conversation.name, keep_newlines=False), NAME_COLUMN_WIDTH),
            str(conversation.turns),
            _local_time(conversation.updated),
        ))
    # columns line up in terminal cells: a CJK character or an emoji takes two, a combining mark none
    widths = [max(cell_len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [_pad(row[0], widths[0]), _pad(row[1], widths[1]), _pad(row[2], widths[2], right=True), row[3]]
        print("  ".join(cells).rstrip())
    return 0


def _show(store: ConversationStore, args) -> int:
    conversation = store.find(args.session, among=_load(store))
    print(_printable(render_text(conversation)), end="")
    return 0


def _export(store: ConversationStore, args) -> int:
    conversation = store.find(args.session, among=_load(store))
    if args.format == "json":
        data = orjson.dumps(conversation.to_dict(), option=orjson.OPT_INDENT_2) + b"\n"
    else:
        data = render_markdown(conversation).encode("utf-8")
    if not args.output or args.output == "-":
        if sys.stdout.isatty():
            # a conversation may carry escape sequences; a terminal would act on them, a file keeps them
            print(_printable(data.decode("utf-8")), end="")
        else:
            sys.stdout.write(data.decode("utf-8"))
        return 0
    target = Path(args.output).expanduser()
    if target.is_dir():
        _error(f"{target} is a folder; give a file name with -o.")
        return 1
    if not target.parent.is_dir():
        _error(f"cannot write {target}: the folder {target.parent} does not exist.")
        return 1
    try:
        write_bytes_atomic(target, data)
    except OSError as exc:
        _error(f"cannot write {target}: {describe_os_error(exc)}.")
        return 1
    print(f"Exported {conversation.name!r} to {target}.", file=sys.stderr)
    return 0


def _delete(store: ConversationStore, args) -> int:
    # a running app would write the conversation back from memory, so deleting waits until it is closed
    with DataDirLock(store.paths.data):
        conversation = store.find(args.session, among=_load(store))
        label = f"{_printable(conversation.name, keep_newlines=False)!r} ({conversation.id}, {_turns(conversation)})"
        if not args.yes:
            if not sys.stdin.isatty():
                _error(f"not deleting {label} without confirmation: no terminal to ask on. Add -y to delete it.")
                return 1
            if not _confirm(f"Delete conversation {label} and its KV snapshot? [y/N] "):
                print("Nothing deleted.")
                return 1
        store.delete(conversation.id)
    print(f"Deleted {label}.")
    return 0


def _confirm(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


def render_text(conversation: Conversation) -> str:
    lines = [
        f"{conversation.name}  ({conversation.id})",
        f"created {_local_time(conversation.created)}, updated {_local_time(conversation.updated)}, {_turns(conversation)}",
        "",
    ]
    if conversation.system:
        lines += ["--- System prompt ---", conversation.system, ""]
    for message in conversation.messages:
        lines += [f"--- {ROLE_TITLES.get(message.role, message.role)}{_stopped_note(message)} ---", message.content, ""]
    return "\n".join(lines)


def render_markdown(conversation: Conversation) -> str:
    """The conversation as Markdown: a heading per message (its role), then its text in a fenced code block.

    Message text is never pasted in as Markdown: a reply cut inside a code block, a heading, raw HTML or
    a ``---`` line would swallow or split the messages after it. Inside a fence longer than any run of
    backticks in the text, a CommonMark parser gives back exactly one block per message, holding the
    text as written (line endings as ``\\n``). The info string says what the text is: replies are Markdown.
    """
    parts = [f"# {_markdown_inline(conversation.name)}", "",
             f"Session {_markdown_inline(conversation.id)}, last updated {_local_time(conversation.updated)}.", ""]
    if conversation.system:
        parts += ["## System prompt", "", _fenced(conversation.system, "text"), ""]
    for message in conversation.messages:
        info = "markdown" if message.role == "assistant" else "text"
        parts += [f"## {ROLE_TITLES.get(message.role, message.role)}{_stopped_note(message)}", "",
                  _fenced(message.content, info), ""]
    return "\n".join(parts)


STOPPED_NOTES = {"cancelled": "stopped by the user", "length": "stopped at the token limit", "time": "stopped at the time limit"}


def _stopped_note(message: Message) -> str:
    """' (stopped by the user)' for a reply that did not end by itself, as the chat's reply footer says."""
    note = STOPPED_NOTES.get((message.stats or {}).get("finish_reason", ""))
    return f" ({note})" if message.role == "assistant" and note else ""


def _fenced(text: str, info: str) -> str:
    """``text`` in a backtick fence that nothing inside it can close (CommonMark: a closing fence is at least as long)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.replace("\r\n", "\n").replace("\r", "\n")
    return f"{fence}{info}\n{body}\n{fence}"


def _markdown_inline(text: str) -> str:
    """One line of literal text in a heading or paragraph: every ASCII punctuation mark is backslash-escaped."""
    flat = " ".join(text.split()) or "(untitled)"
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", flat)


def _turns(conversation: Conversation) -> str:
    return "1 turn" if conversation.turns == 1 else f"{conversation.turns} turns"


def _local_time(timestamp: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return "?"  # a timestamp from a hand-edited file can be out of the platform's range


def _printable(text: str, keep_newlines: bool = True) -> str:
    """``text`` with control characters (escape sequences included) and bidi controls shown, never acted on."""
    return visible(text, one_line=not keep_newlines)


def _shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal cells, cut between graphemes (never inside an emoji sequence)."""
    graphemes, total = split_graphemes(text)
    if total <= width:
        return text
    used, end = 0, 0
    for start, stop, cells in graphemes:
        if used + cells > width - 1:
            break
        used, end = used + cells, stop
    return text[:end] + "…"


def _pad(text: str, width: int, right: bool = False) -> str:
    padding = " " * max(0, width - cell_len(text))
    return padding + text if right else text + padding
