"""Text from a user, the model or a file is never parsed as Textual markup, wherever the app shows it.

The class: tab names, system prompts, conversation titles, theme names, paths and error messages that
quote any of them, reaching a Textual API that parses markup. The tests put markup-like text (an
unterminated ``[/``, closing tags, click actions, variables, backslashes) into every one of those
and walk the screens that show them; a static check catches the next call site that passes a plain
string to a markup-parsing API.
"""

from __future__ import annotations

import ast
import html
import random
import re
import time
from pathlib import Path

import pytest
from textual.command import CommandPalette
from textual.content import Content
from textual.markup import escape

from chatkv.config import Settings
from chatkv.conversation import Message
from chatkv.paths import Paths
from chatkv.store import ConversationStore, StoreError
from chatkv.tui.app import AppOptions, ChatApp, make_app
from chatkv.tui.literal_text import literal_markup
from chatkv.tui.screens.confirm_close import ConfirmCloseScreen
from chatkv.tui.screens.rename_tab import RenameTabScreen
from stand_in_engine import StandInEngine

SIZE = (120, 40)

# each has broken Textual on some path: a closing tag with no opening, an unterminated [/, a click
# action, a variable, a style tag, backslashes that change how an escape reads, a Rich link
HOSTILE_TEXTS = [
    "paths [/tmp]",
    "unterminated [/",
    "[b]bold[/b] and [/]",
    "[@click=app.quit]quit[/]",
    "[$accent]x[/$accent] $accent",
    "back\\slash [x] \\[y] \\",
    "[link=https://example.com]here[/link]",
    "[[double]] ]] [[",
]


async def wait_until(pilot, condition, timeout: float = 30.0, message=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time {message()}")
        await pilot.pause(0.02)


def screen_text(app: ChatApp) -> str:
    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def build(paths: Paths, **options) -> ChatApp:
    return make_app(Settings(), StandInEngine(["ok"]), ConversationStore(paths), paths.user_themes, AppOptions(**options))


@pytest.fixture
def paths(data_dir: Path) -> Paths:
    return Paths.resolve(data_dir)


async def test_a_tab_renamed_with_a_closing_tag_opens_the_palette_now_and_after_a_relaunch(paths):
    app = build(paths)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, RenameTabScreen))
        await pilot.press("ctrl+u", *"paths [/tmp]", "enter")
        await wait_until(pilot, lambda: app.chat_tabs.current.conversation.name == "paths [/tmp]")
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"paths")
        await wait_until(pilot, lambda: "Go to the tab 'paths [/tmp]'" in screen_text(app))
    app = build(paths)  # the name is saved: the next launch must open the palette too
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"paths")
        await wait_until(pilot, lambda: "Switch to: paths [/tmp]" in screen_text(app))


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
async def test_markup_like_text_is_shown_literally_in_every_screen_that_shows_it(paths, text):
    store = ConversationStore(paths)
    closed = store.new_conversation(f"closed {text}", f"system {text}")
    closed.messages.append(Message("user", f"question {text}"))
    store.save(closed)
    theme_folder = paths.user_themes
    theme_folder.mkdir(parents=True, exist_ok=True)
    (theme_folder / "hostile.toml").write_text(
        f'name = {escape_toml(f"theme {text}")}\ndark = true\nprimary = "#4fb3bf"\n', encoding="utf-8")
    app = make_app(Settings(), StandInEngine([f"reply {text}"]), store, paths.user_themes, AppOptions(theme=f"gone {text}"))
    async with app.run_test(size=SIZE) as pilot:
        tab = await app.open_new_conversation(f"tab {text}", f"system {text}")
        await pilot.pause()
        seen = screen_text(app)
        assert f"tab {text}" in seen  # the tab label
        notes = shown_notifications(app)
        assert any(repr(f"gone {text}") in note for note in notes)  # the note that the configured theme is missing
        assert any("hostile.toml" in note for note in notes)  # the broken user theme file, reported by path
        app.report_problem(str(StoreError(f"Could not save {paths.sessions / text}")))  # errors quoting a path
        await pilot.pause()
        assert any(str(paths.sessions / text) in note for note in shown_notifications(app))
        tab.send("hello")
        await wait_until(pilot, lambda: not tab.generating and len(tab.conversation.messages) == 2)
        if "\\" not in text:  # a reply is Markdown by design, where a backslash escapes the next character
            await wait_until(pilot, lambda: f"reply {text}" in screen_text(app))
        for query, shown in (("", None), ("Switch to: tab", f"Go to the tab {'tab ' + text!r}"),
                             ("Reopen: closed", f"Open the saved conversation {'closed ' + text!r}")):
            await pilot.press("ctrl+p")
            await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
            await pilot.press(*query)
            await pilot.pause(0.3)
            if shown:
                await wait_until(pilot, lambda: shown in screen_text(app), message=lambda: screen_text(app)[-3000:])
            await pilot.press("escape")
            await wait_until(pilot, lambda: not isinstance(app.screen, CommandPalette))
        app.search_themes()  # the palette's Theme command
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"theme")
        await pilot.pause(0.3)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, CommandPalette))
        await pilot.press("ctrl+w")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmCloseScreen))
        await wait_until(pilot, lambda: f"Close {'tab ' + text!r}?" in screen_text(app))
        await pilot.press("escape")
        await pilot.press("f2", "f2")
        await pilot.pause()
    assert app.return_code in (0, None)


def shown_notifications(app: ChatApp) -> list[str]:
    """Every notification's text, as its toast renders it: each one is literal (markup off), so as written."""
    notifications = list(app._notifications)
    assert all(not notification.markup for notification in notifications)
    return [notification.message for notification in notifications]


def escape_toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def test_a_user_theme_whose_name_is_markup_is_listed_and_picked_literally(paths):
    theme_folder = paths.user_themes
    theme_folder.mkdir(parents=True, exist_ok=True)
    good = (Path(__file__).parent.parent / "themes" / "chatkv-dark.toml").read_text(encoding="utf-8")
    (theme_folder / "odd.toml").write_text(re.sub(r'^name = .*$', 'name = "odd [/x] theme"', good, flags=re.M), encoding="utf-8")
    app = build(paths)
    async with app.run_test(size=SIZE) as pilot:
        app.search_themes()
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"odd")
        await pilot.pause(0.3)
        assert "odd [/x] theme" in screen_text(app)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.theme == "odd [/x] theme")


def test_literal_markup_renders_every_string_as_written_where_textual_escape_does_not():
    assert Content.from_markup(literal_markup("unterminated [/")).plain == "unterminated [/"
    rng = random.Random(9)
    alphabet = "[]/\\ab=@$:.'\"#(){} \n"
    escape_failures = 0
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert Content.from_markup(literal_markup(text)).plain == text
        try:
            escape_failures += Content.from_markup(escape(text)).plain != text
        except Exception:
            escape_failures += 1
    assert escape_failures > 0  # why chatkv does not rely on textual.markup.escape


# Textual APIs that parse a plain string argument as markup. Passing them Content, a string literal
# written in this repository, or literal_markup(...) is safe; anything else is text from somewhere else.
MARKUP_CALLS = {"Label", "Static", "Button", "Hit", "DiscoveryHit", "Tooltip", "update", "panic", "Toast", "TabPane", "Tab"}
MARKUP_KEYWORDS = {"help", "tooltip", "title", "sub_title", "label", "prompt", "placeholder"}
SAFE_WRAPPERS = {"Content", "literal_markup", "highlight_literally", "Text"}
# call sites checked by hand, with why each is safe; a new one needs the same look
CHECKED_CALLS = {
    ("app.py", "super().notify("): "ChatApp.notify always passes markup=False",
    ("themes.py", "themes.update("): "a dict, not a widget",
    ("messages.py", "self.markdown.update("): "Markdown source (raw HTML off), never Textual markup",
    ("stats_panel.py", "self.update("): "StatsSection is built with markup=False",
}


def _is_safe(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        return name in SAFE_WRAPPERS
    return False


def test_no_text_from_outside_reaches_a_markup_parsing_textual_api():
    source = Path(__file__).parent.parent / "chatkv" / "tui"
    unsafe = []
    for path in sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            arguments = []
            if name in MARKUP_CALLS and node.args:
                arguments.append(node.args[0] if name not in {"Hit"} else node.args[1])
            arguments += [keyword.value for keyword in node.keywords if keyword.arg in MARKUP_KEYWORDS]
            call = ast.unparse(node)
            if any(path.name == file and call.startswith(start) for file, start in CHECKED_CALLS):
                continue
            for argument in arguments:
                if not _is_safe(argument):
                    unsafe.append(f"{path.relative_to(source)}:{node.lineno} {call[:80]}")
    assert unsafe == []
