"""Render a conversation to the exact token ids the model sees, and fit it to the context.

Assistant messages that carry ``token_ids`` are rendered with those ids verbatim (plus the
template's end-of-turn suffix), never by re-tokenizing their text: SmolLM2 emits a single
double-newline token that re-tokenizes as two, and one such difference stops KV reuse there.

The template is applied to growing prefixes of the conversation; each message's segment is the
text the template adds for it. ChatML segments start and end at special tokens, so tokenizing
them one by one gives the same ids as tokenizing the whole text, and a segment's ids can be cached.

Message text is content, never control: the template is rendered with a placeholder for each
message's text, so only the template's own markers (``<|im_start|>``, ``<|im_end|>``, ...) become
special tokens. The text between markers, message text included, is tokenized with special-token
parsing off, so a user who types ``<|im_end|>`` gets the ids of those characters, not end-of-turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from chatkv.conversation import Message
from chatkv.engine.api import EngineError

_SENTINEL = "\x00chatkv-reply\x00"
_PLACEHOLDER = "\x00chatkv-content-{}\x00"  # stands for message {}'s text while the template is rendered
_PLACEHOLDER_PATTERN = re.compile("\x00chatkv-content-([0-9]+)\x00")
# past the context limit, old turns go until the prompt takes at most this share of it, so the next turns have
# room to grow while they reuse the kept prefix (llama.cpp's context shift also frees half the context)
LOW_WATER = 0.5


@dataclass
class RenderedPrompt:
    ids: list[int]
    dropped_messages: int  # oldest turns left out so the conversation fits


class ChatRenderer:
    def __init__(self, tokenizer, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        # the template's markers: every special added token, longest first so none is cut short by another
        self.marker_ids = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()
                           if token.special}
        markers = sorted(self.marker_ids, key=len, reverse=True)
        self._marker_pattern = re.compile("(" + "|".join(map(re.escape, markers)) + ")") if markers else None
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
        """Ids of template text: the markers in it become special tokens (message text never reaches here)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text taken as characters only: a special token's text here is just text."""
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _encode_with_contents(self, text: str, contents: tuple[str, ...]) -> list[int]:
        """Ids of template output ``text`` whose placeholders stand for ``contents``: markers special, the rest plain.

        Each run of text between two markers, message text included, is tokenized as one piece, as the
        tokenizer would have done with the message text in place; only its special-token parsing is off.
        """
        pieces = self._marker_pattern.split(text) if self._marker_pattern else [text]
        ids: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2 == 1:  # a marker the template wrote
                ids.append(self.marker_ids[piece])
            elif piece:
                ids.extend(self._encode_plain(_PLACEHOLDER_PATTERN.sub(lambda match: contents[int(match.group(1))], piece)))
        return ids

    def _encode_tuple(self, text: str, contents: tuple[str, ...] = ()) -> tuple[int, ...]:
        return tuple(self._encode_with_contents(text, contents))

    def _reply_suffix_ids(self, reply_ids: list[int]) -> list[int]:
        suffix = self.reply_suffix_text
        if reply_ids and reply_ids[-1] in self.eos_token_ids:
            # the model already emitted the end-of-turn token; only what follows it in the template remains
            eos_text = self.tokenizer.decode([reply_ids[-1]])
            if suffix.startswith(eos_text):
                suffix = suffix[len(eos_text):]
        return list(self._encode_cached(suffix))

    def _does_not_fit(self, head: list[Message], needed: int, max_prompt_tokens: int) -> str:
        """Why the system prompt and the new message alone do not fit, blaming the one that does not."""
        fixed = len(self.render(head + [Message("user", "")]))  # the system prompt and the template, no message text
        room = "a prompt holds at most {:,} tokens here (max_tokens_per_session, less room for the reply)".format(max_prompt_tokens)
        if fixed >= max_prompt_tokens:
            if head:
                return (f"The system prompt is too long: it takes {fixed:,} tokens and {room}, which leaves no room for "
                        f"a message. Shorten the system prompt (start a new tab with a shorter one), or raise "
                        f"max_tokens_per_session.")
            return f"max_tokens_per_session is too small: the chat template alone takes {fixed:,} tokens and {room}. Raise it."
        message_tokens = needed - fixed
        left = max_prompt_tokens - fixed
        after_system = " after the system prompt" if head else ""
        return (f"This message is too long: it takes {message_tokens:,} tokens and {left:,} are left{after_system} "
                f"({room}). Shorten it, or raise max_tokens_per_session.")

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt."""
        as_dicts = [{"role": m.role, "content": _PLACEHOLDER.format(index)} for index, m in enumerate(messages)]
        contents = tuple(m.content for m in messages)
        ids: list[int] = []
        previous_text = ""
        for index, message in enumerate(messages):
            text = self._template(as_dicts[: index + 1], add_generation_prompt=False)
            if not text.startswith(previous_text):
                # a template that rewrites earlier text: fall back to tokenizing the whole conversation
                return self._encode_with_contents(self._template(as_dicts, add_generation_prompt=True), contents)
            segment = text[len(previous_text):]
            previous_text = text
            if message.role == "assistant" and message.token_ids is not None:
                ids.extend(self.reply_prefix_ids)
                ids.extend(message.token_ids)
                ids.extend(self._reply_suffix_ids(message.token_ids))
            else:
                # keyed by the segment with its placeholder and the one text it stands for: reused across turns
                others = {int(number) for number in _PLACEHOLDER_PATTERN.findall(segment)} - {index}
                if others:  # a template that repeats another message's text here
                    ids.extend(self._encode_with_contents(segment, contents))
                else:
                    own = _PLACEHOLDER.format(index)
                    ids.extend(self._encode_cached(segment.replace(own, _PLACEHOLDER.format(0)), (message.content,)))
        ids.extend(self.generation_prompt_ids)
        return ids

    def fit(self, messages: list[Message], max_prompt_tokens: int, already_dropped: int = 0,
            low_water: float = LOW_WATER) -> RenderedPrompt:
        """Render, leaving out the oldest turns (never the system prompt, never the new message) so it fits.

        ``already_dropped``: how many messages the session's previous turn left out; they stay out while the
        rest fits, so the prompt keeps the prefix the session's KV holds. When it no longer fits, turns go until
        the prompt takes at most ``low_water`` of ``max_prompt_tokens``: the turns after that reuse the kept
        prefix again instead of each dropping one turn and recomputing the whole conversation.

        Raises ``EngineError`` when even the system prompt and the new message alone do not fit; its
        message names which of the two is too long and by how many tokens.
        """
        head = [m for m in messages[:1] if m.role == "system"]
        body = messages[len(head):]
        dropped = 0
        if already_dropped < len(body) - 1:  # else the conversation got shorter (an edit, a regenerate): start over
            while dropped < already_dropped:
                cut = _oldest_turn(body)
                dropped, body = dropped + cut, body[cut:]
        ids = self.render(head + body)
        if len(ids) <= max_prompt_tokens:
            return RenderedPrompt(ids, dropped)
        target = int(max_prompt_tokens * low_water)
        while len(ids) > target:
            if len(body) <= 1:
                if len(ids) <= max_prompt_tokens:
                    break
                raise EngineError(self._does_not_fit(head, len(ids), max_prompt_tokens))
            cut = _oldest_turn(body)
            dropped, body = dropped + cut, body[cut:]
            ids = self.render(head + body)
        return RenderedPrompt(ids, dropped)


def _oldest_turn(body: list[Message]) -> int:
    """How many messages the oldest turn takes: its user message and the replies up to the next user message
    (never the last message, the one being answered)."""
    cut = 1
    while cut < len(body) - 1 and body[cut].role != "user":
        cut += 1
    return cut
