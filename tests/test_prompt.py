"""Prompt rendering keeps the model's own reply ids and otherwise matches the tokenizer's chat template."""

from __future__ import annotations

from chatkv.conversation import Message
from chatkv.engine.engine import eos_token_ids
from chatkv.engine.prompt import ChatRenderer


def renderer_for(bundle) -> ChatRenderer:
    return ChatRenderer(bundle.tokenizer, eos_token_ids(bundle))


def template_ids(tokenizer, messages: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_text_only_conversation_renders_exactly_like_the_chat_template(real_bundle):
    messages = [Message("system", "Be brief."), Message("user", "Hello!"), Message("assistant", "Hi, how can I help?"),
                Message("user", "Tell me a joke.\n\nA short one.")]
    assert renderer_for(real_bundle).render(messages) == template_ids(real_bundle.tokenizer, messages)


def test_default_system_prompt_of_the_template_is_kept_when_none_is_given(real_bundle):
    messages = [Message("user", "Hello!")]
    assert renderer_for(real_bundle).render(messages) == template_ids(real_bundle.tokenizer, messages)


def test_reply_ids_are_used_verbatim_even_where_retokenizing_would_differ(real_bundle):
    tokenizer = real_bundle.tokenizer
    double_newline = tokenizer.convert_tokens_to_ids("ĊĊ")
    reply_ids = tokenizer.encode("First part.", add_special_tokens=False) + [double_newline] + \
        tokenizer.encode("Second part.", add_special_tokens=False) + [tokenizer.eos_token_id]
    reply_text = tokenizer.decode(reply_ids, skip_special_tokens=True)
    renderer = renderer_for(real_bundle)
    history = [Message("user", "hi"), Message("assistant", reply_text, token_ids=reply_ids), Message("user", "more")]
    ids = renderer.render(history)
    prefix = renderer.render(history[:1])
    assert ids[: len(prefix) + len(reply_ids)] == prefix + reply_ids
    # the re-tokenized text would not reproduce the model's ids, which is why they are kept
    assert tokenizer.encode(reply_text, add_special_tokens=False) != reply_ids[:-1]
