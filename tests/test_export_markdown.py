"""A Markdown export round-trips: a CommonMark parser (markdown-it-py) finds one block per message, with its role.

Whatever a message holds (an unclosed code block, fences of any length, headings, raw HTML, front
matter, setext underlines, Windows line endings), it cannot swallow, split or retitle the messages
after it, and the block gives back the text as written.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from chatkv.cli import main
from chatkv.conversation import Conversation, Message
from chatkv.paths import Paths
from chatkv.sessions_cli import ROLE_TITLES, render_markdown
from chatkv.store import ConversationStore

HOSTILE_CONTENTS = [
    "Here is the code:\n```python\ndef f():\n    return 1",  # a reply cut inside a code block (max_new_tokens)
    "````\nfour\n```\nthree inside four",
    "```" + "`" * 12 + "\nlong fence",
    "~~~\ntilde fence never closed",
    "## You\n\nA fake heading for a fake message",
    "# Title\n### deeper",
    "hello\n---",  # a setext heading underline
    "hello\n===",
    "---\ntitle: front matter\n---\nbody",
    "<!-- an HTML comment that never ends",
    "<div>\n\nraw html block",
    "<script>\nalert(1)\n</script>",
    "<pre>\nunclosed pre",
    "    indented code\n\n  - a list\n> a quote",
    "trailing newlines\n\n\n",
    "\n\nleading newlines",
    "windows\r\nline\r\nendings\r\n",
    "backslash \\` and `inline` and ``double``",
    "<|im_end|> and [/tmp] and $x",
    "",
    "`",
    "```",
]


def parse_blocks(markdown: str) -> list[tuple[str, str]]:
    """(heading text, the fence's text) for every level-2 heading, as a CommonMark parser reads the file."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    blocks: list[tuple[str, str]] = []
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == "h2":
            title = tokens[index + 1].content
            following = tokens[index + 3] if index + 3 < len(tokens) else None
            body = following.content if following is not None and following.type == "fence" else None
            blocks.append((title, body))
    return blocks


def expected_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") + "\n"


def assert_round_trips(conversation: Conversation) -> None:
    blocks = parse_blocks(render_markdown(conversation))
    expected = [("System prompt", expected_text(conversation.system))] if conversation.system else []
    expected += [(ROLE_TITLES[m.role], expected_text(m.content)) for m in conversation.messages]
    assert blocks == expected
    tokens = MarkdownIt("commonmark").parse(render_markdown(conversation))
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1"] + ["h2"] * len(expected)


@pytest.fixture
def store(data_dir: Path) -> ConversationStore:
    return ConversationStore(Paths.resolve())


def test_a_reply_cut_inside_a_code_block_keeps_every_later_message_its_own_heading(store, capsys):
    conversation = store.new_conversation(name="code", system="")
    conversation.messages += [
        Message("user", "Write a function."),
        Message("assistant", "Sure:\n```python\ndef f():\n    return", token_ids=[1, 2]),  # stopped by max_new_tokens
        Message("user", "Finish it."),
        Message("assistant", "Done.", token_ids=[3]),
    ]
    store.save(conversation)
    assert main(["sessions", "export", conversation.id, "--format", "md"]) == 0
    blocks = parse_blocks(capsys.readouterr().out)
    assert [title for title, _ in blocks] == ["You", "Assistant", "You", "Assistant"]
    assert blocks[2][1] == "Finish it.\n"


@pytest.mark.parametrize("content", HOSTILE_CONTENTS)
def test_any_message_text_round_trips_as_one_block_with_its_role(store, content):
    conversation = store.new_conversation(name="hostile", system=content or "sys")
    conversation.messages += [Message("user", content), Message("assistant", content, token_ids=[1]),
                              Message("user", "after"), Message("assistant", "last", token_ids=[2])]
    assert_round_trips(conversation)


def test_random_mixes_of_markdown_syntax_round_trip(store):
    pieces = ["```", "````", "~~~", "`", "#", "## You", "---", "===", "<!--", "-->", "<div>", "</div>", "<pre>", "\n",
              "\n\n", "    ", "> ", "- ", "1. ", "\\", "[x]", "*", "_", "text", "\r\n", "|a|b|", "<|im_end|>"]
    rng = random.Random(5)
    for _ in range(300):
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(4)]
        conversation = store.new_conversation(name="".join(rng.choice(pieces) for _ in range(4)), system=texts[0])
        conversation.messages += [Message("user", texts[1]), Message("assistant", texts[2], token_ids=[1]),
                                  Message("user", texts[3])]
        assert_round_trips(conversation)


def test_a_name_with_markdown_in_it_stays_the_one_title(store):
    conversation = store.new_conversation(name="## You\n# not [a](link) `x`", system="")
    conversation.messages.append(Message("user", "hi"))
    tokens = MarkdownIt("commonmark").parse(render_markdown(conversation))
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1", "h2"]
    assert MarkdownIt("commonmark").renderInline(headings[0]) == "## You # not [a](link) `x`"
