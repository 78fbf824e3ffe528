"""A conversation as the app and the store see it: messages, each with the model's exact token ids.

Assistant replies keep ``token_ids``, the ids the model generated, so a later turn renders the
history with exactly those ids instead of re-tokenizing the reply text (which does not always give
the same ids back, and would defeat KV reuse).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


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
        return cls(
            role=data["role"],
            content=data["content"],
            token_ids=data.get("token_ids"),
            stats=data.get("stats"),
        )


def new_session_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Conversation:
    id: str
    name: str
    system: str = ""
    messages: list[Message] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def prompt_messages(self) -> list[Message]:
        """The messages the model sees: the system prompt (if any) then the turns."""
        head = [Message("system", self.system)] if self.system else []
        return head + self.messages

    @property
    def turns(self) -> int:
        return sum(1 for message in self.messages if message.role == "user")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "id": self.id,
            "name": self.name,
            "system": self.system,
            "created": self.created,
            "updated": self.updated,
            "messages": [message.to_dict() for message in self.messages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Conversation":
        return cls(
            id=data["id"],
            name=data.get("name") or data["id"],
            system=data.get("system", ""),
            messages=[Message.from_dict(item) for item in data.get("messages", [])],
            created=data.get("created", time.time()),
            updated=data.get("updated", time.time()),
        )
