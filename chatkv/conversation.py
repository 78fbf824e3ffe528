"""A conversation as the app and the store see it: messages, each with the model's exact token ids.

Assistant replies keep ``token_ids``, the ids the model generated, so a later turn renders the
history with exactly those ids instead of re-tokenizing the reply text (which does not always give
the same ids back, and would defeat KV reuse).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
FORMAT_VERSION = 1


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_token_ids(token_ids: Any) -> None:
    if not isinstance(token_ids, list):
        raise ValueError(f"token_ids must be a list of integers, got {_type_name(token_ids)}")
    for position, token_id in enumerate(token_ids):
        # bool is an int subclass in Python; a stored true/false is a corrupt file, not token 1/0
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"token_ids[{position}] must be a non-negative integer, got {token_id!r}")


def _check_timestamp(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if value is None:
        return time.time()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number of seconds, got {value!r}")
    return float(value)


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    token_ids: list[int] | None = None
    # the finished turn's figures (assistant messages only): tokens, ttft_ms, tok/s, reused, finish reason
    stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.token_ids is not None:
            data["token_ids"] = self.token_ids
        if self.stats:
            data["stats"] = self.stats
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Message":
        """Build a message from stored data; a wrong shape raises ValueError saying which field and why."""
        if not isinstance(data, dict):
            raise ValueError(f"a message must be an object, got {_type_name(data)}")
        role = data.get("role")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        content = data.get("content")
        if not isinstance(content, str):
            raise ValueError(f"content must be a string, got {_type_name(content)}")
        token_ids = data.get("token_ids")
        if token_ids is not None:
            _check_token_ids(token_ids)
        stats = data.get("stats")
        if stats is not None and not isinstance(stats, dict):
            raise ValueError(f"stats must be an object, got {_type_name(stats)}")
        return cls(role=role, content=content, token_ids=token_ids, stats=stats)


def new_session_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class ForkOrigin:
    """Where a forked conversation came from: the parent's id and name, and the last message copied from it."""

    session: str
    name: str
    message: int  # position in the parent's messages (system prompt excluded), 0-based

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "name": self.name, "message": self.message}

    @classmethod
    def from_dict(cls, data: Any) -> "ForkOrigin":
        if not isinstance(data, dict):
            raise ValueError(f"forked_from must be an object, got {_type_name(data)}")
        session, name, message = data.get("session"), data.get("name"), data.get("message")
        if not isinstance(session, str) or not isinstance(name, str):
            raise ValueError("forked_from.session and forked_from.name must be strings")
        if not isinstance(message, int) or isinstance(message, bool) or message < 0:
            raise ValueError(f"forked_from.message must be a non-negative integer, got {message!r}")
        return cls(session, name, message)


@dataclass
class Conversation:
    id: str
    name: str
    system: str = ""
    messages: list[Message] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    forked_from: ForkOrigin | None = None
    model: str | None = None  # a remote server's model chosen for this conversation (--backend); None: the default
    # generation settings the user chose for this conversation (``Sampling``'s fields); None: the app's defaults
    sampling: dict[str, Any] | None = None

    def prompt_messages(self) -> list[Message]:
        """The messages the model sees: the system prompt (if any) then the turns."""
        head = [Message("system", self.system)] if self.system else []
        return head + self.messages

    @property
    def turns(self) -> int:
        return sum(1 for message in self.messages if message.role == "user")

    def fork(self, message: int, new_id: str, name: str) -> "Conversation":
        """A new conversation holding copies of messages 0..``message`` (system prompt kept), noting its origin.

        Raises ``IndexError`` if ``message`` is not a position in ``messages``.
        """
        if not 0 <= message < len(self.messages):
            raise IndexError(message)
        copied = [Message(m.role, m.content, list(m.token_ids) if m.token_ids is not None else None,
                          dict(m.stats) if m.stats else None) for m in self.messages[: message + 1]]
        return Conversation(id=new_id, name=name, system=self.system, messages=copied, model=self.model,
                            forked_from=ForkOrigin(self.id, self.name, message),
                            sampling=dict(self.sampling) if self.sampling else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "id": self.id,
            "name": self.name,
            "system": self.system,
            "created": self.created,
            "updated": self.updated,
            "messages": [message.to_dict() for message in self.messages],
            **({"forked_from": self.forked_from.to_dict()} if self.forked_from else {}),
            **({"model": self.model} if self.model else {}),
            **({"sampling": self.sampling} if self.sampling else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Conversation":
        """Build a conversation from stored data; a wrong shape raises ValueError saying which field and why.

        Only the shape is checked here; whether the id is safe to use as a file name is the store's job.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a conversation must be an object, got {_type_name(data)}")
        version = data.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"written by a newer chatkv (format version {version}, this one reads {FORMAT_VERSION})")
        session_id = data.get("id")
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"id must be a non-empty string, got {session_id!r}")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string, got {_type_name(name)}")
        system = data.get("system", "")
        if not isinstance(system, str):
            raise ValueError(f"system must be a string, got {_type_name(system)}")
        raw_messages = data.get("messages", [])
        if not isinstance(raw_messages, list):
            raise ValueError(f"messages must be a list, got {_type_name(raw_messages)}")
        messages = []
        for position, item in enumerate(raw_messages):
            try:
                messages.append(Message.from_dict(item))
            except ValueError as exc:
                raise ValueError(f"messages[{position}]: {exc}") from None
        forked_from = data.get("forked_from")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a string, got {_type_name(model)}")
        sampling = data.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise ValueError(f"sampling must be an object, got {_type_name(sampling)}")
        return cls(
            id=session_id,
            name=name or session_id,
            system=system,
            messages=messages,
            created=_check_timestamp(data, "created"),
            updated=_check_timestamp(data, "updated"),
            forked_from=ForkOrigin.from_dict(forked_from) if forked_from is not None else None,
            model=model or None,
            sampling=sampling or None,  # its values are checked where they are used (the app falls back to defaults)
        )
