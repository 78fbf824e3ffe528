"""Render a conversation to the exact token ids the model sees, and fit it to the context.

Assistant messages that carry ``token_ids`` are rendered with those ids verbatim (plus the
template's end-of-turn suffix), never by re-tokenizing their text: SmolLM2 emits a single
double-newline token that re-tokenizes as two, and one such difference stops KV reuse there.

The template is applied to growing prefixes of the conversation; each message's segment is the
text the template adds for it. ChatML segments start and end at special tokens, so tokenizing
them one by one gives the same ids as tokenizing the whole text, and a segment's ids can be cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from chatkv.conversation import Message
from chatkv.engine.api import EngineError

_SENTINEL = "\x00chatkv-reply\x00"


@dataclass
class RenderedPrompt:
    ids: list[int]
    dropped_messages: int  # oldest turns left out so the conversation fits


class ChatRenderer:
    def __init__(self, tokenizer, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        probe = [{"role": "user", "content": "hi"}]
        without_prompt = self._template(probe, add_generation_prompt=False)
        with_prompt = self._template(probe, add_generation_prompt=True)
        if not with_prompt.startswith(without_prompt):
            raise EngineError("this model's chat template cannot be rendered incrementally")
        self.generation_prompt_ids = self._encode(with_prompt[len(without_prompt):])
        with_reply = self._template(probe + [{"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        head, _, suffix = with_reply.partition(_SENTINEL)
        self.reply_prefix_ids = self._encode(head[len(without_prompt):])
        self.reply_suffix_text = suffix
        self._encode_cached = lru_cache(maxsize=4096)(self._encode_tuple)

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_tuple(self, text: str) -> tuple[int, ...]:
        return tuple(self._encode(text))

    def _reply_suffix_ids(self, reply_ids: list[int]) -> list[int]:
        suffix = self.reply_suffix_text
        if reply_ids and reply_ids[-1] in self.eos_token_ids:
            # the model already emitted the end-of-turn token; only what follows it in the template remains
            eos_text = self.tokenizer.decode([reply_ids[-1]])
            if suffix.startswith(eos_text):
                suffix = suffix[len(eos_text):]
        return list(self._encode_cached(suffix))

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt."""
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        ids: list[int] = []
        previous_text = ""
        for index, message in enumerate(messages):
            text = self._template(as_dicts[: index + 1], add_generation_prompt=False)
            if not text.startswith(previous_text):
                # a template that rewrites earlier text: fall back to tokenizing the whole conversation
                return self._encode(self._template(as_dicts, add_generation_prompt=True))
            segment = text[len(previous_text):]
            previous_text = text
            if message.role == "assistant" and message.token_ids is not None:
                ids.extend(self.reply_prefix_ids)
                ids.extend(message.token_ids)
                ids.extend(self._reply_suffix_ids(message.token_ids))
            else:
                ids.extend(self._encode_cached(segment))
        ids.extend(self.generation_prompt_ids)
        return ids

    def fit(self, messages: list[Message], max_prompt_tokens: int) -> RenderedPrompt:
        """Render, dropping the oldest turns (never the system prompt, never the new message) until it fits."""
        head = [m for m in messages[:1] if m.role == "system"]
        body = messages[len(head):]
        dropped = 0
        while True:
            ids = self.render(head + body)
            if len(ids) <= max_prompt_tokens:
                return RenderedPrompt(ids, dropped)
            if len(body) <= 1:
                raise EngineError(
                    f"This message is too long: the prompt needs {len(ids):,} tokens but a conversation holds at most "
                    f"{max_prompt_tokens:,} here. Shorten it, or raise max_tokens_per_session."
                )
            # drop the oldest user message and the replies that follow it, up to the next user message
            cut = 1
            while cut < len(body) - 1 and body[cut].role != "user":
                cut += 1
            dropped += cut
            body = body[cut:]
