"""The command palette's chatkv commands: every app action, a 'Switch to' per open tab, a 'Reopen' per closed conversation.

Theme switching is Textual's 'Theme' command, with ``ThemeCommands`` listing the themes (a user theme's
name is shown literally); the app remembers whatever it picks. Names in prompts and help lines are
never parsed as markup (``chatkv.tui.literal_text``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.fuzzy import Matcher

from chatkv.conversation import Conversation
from chatkv.tui.literal_text import literal_markup
from chatkv.visible_text import visible


class PaletteCommand(NamedTuple):
    name: str
    help: str
    run: Callable[[], object]


def highlight_literally(matcher: Matcher, text: str) -> Content:
    """Like ``Matcher.highlight``, but a tab name with brackets in it is shown as written, never parsed as markup."""
    text = visible(text, one_line=True)
    content = Content(text)
    _, offsets = matcher.fuzzy_search.match(matcher.query, text)
    for offset in offsets:
        content = content.stylize(matcher.match_style, offset, offset + 1)
    return content


class ChatCommands(Provider):
    async def startup(self) -> None:
        # read once per palette opening, not per keystroke
        self.closed: list[Conversation] = await self.app.closed_conversations()
        self.models: list[str] = await self.app.server_models()

    def commands(self) -> list[PaletteCommand]:
        app = self.app  # the ChatApp (tui/app.py), which imports this module
        commands = [
            PaletteCommand("New tab", "Open a chat tab, with an optional name and system prompt", app.action_new_tab),
            PaletteCommand("Close tab", "Close the current tab (its conversation stays saved) or delete it", app.action_close_tab),
            PaletteCommand("Rename tab", "Give the current tab a new name", app.action_rename_tab),
            PaletteCommand("Generation settings", "Temperature, top-p, repetition penalty and reply length of the current tab",
                           app.action_generation_settings),
            PaletteCommand("Copy last reply", "Copy the current tab's last reply to the clipboard (F3)", app.action_copy_reply),
            PaletteCommand("Copy last code block", "Copy the last code block of the current tab's replies (F5)", app.action_copy_code),
            PaletteCommand("Stop reply", "Stop the reply being written in the current tab, keeping its text", app.action_stop_reply),
            PaletteCommand("Regenerate reply", "Write the last reply of the current tab again, replacing it (Ctrl+G)",
                           app.action_regenerate),
            PaletteCommand("Edit and resend message", "Edit the highlighted message (or your last one) and send it again; "
                           "the messages after it leave the conversation", app.action_edit_message),
            PaletteCommand("Fork tab here", "A new tab with the conversation up to the highlighted message (or all of it), "
                           "reusing its KV", app.action_fork_tab),
            PaletteCommand("Next tab", "Switch to the tab on the right", app.action_next_tab),
            PaletteCommand("Previous tab", "Switch to the tab on the left", app.action_previous_tab),
            PaletteCommand("Toggle stats panel", "Show or hide the live cache and batching figures", app.action_toggle_stats),
            PaletteCommand("Save KV snapshots", "Write every session's KV cache to disk now", app.action_save_snapshots),
        ]
        for tab in app.chat_tabs.chat_tabs:
            name = visible(tab.conversation.name, one_line=True)
            commands.append(PaletteCommand(f"Switch to: {name}", f"Go to the tab {name!r}", partial(app.chat_tabs.activate, tab)))
        for model in self.models:
            commands.append(PaletteCommand(f"Model: {visible(model, one_line=True)}", f"Answer this tab's next turns with the server's model {model!r}",
                                           partial(app.use_model, model)))
        for conversation in self.closed:
            commands.append(PaletteCommand(
                f"Reopen: {visible(conversation.name, one_line=True)}",
                f"Open the saved conversation {conversation.name!r} ({conversation.turns} turns) in a tab",
                partial(app.open_saved, conversation.id),
            ))
        return commands

    async def discover(self) -> Hits:
        for command in self.commands():
            yield DiscoveryHit(Content(visible(command.name, one_line=True)), command.run, text=command.name, help=literal_markup(command.help))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self.commands():
            score = matcher.match(command.name)
            if score > 0:
                yield Hit(score, highlight_literally(matcher, command.name), command.run, text=command.name,
                          help=literal_markup(command.help))


class ThemeCommands(Provider):
    """Every registered theme by name, as Textual's theme list, but with names shown as written."""

    def themes(self) -> list[str]:
        return sorted(self.app.available_themes)

    def use(self, name: str) -> None:
        self.app.theme = name

    async def discover(self) -> Hits:
        for name in self.themes():
            yield DiscoveryHit(Content(visible(name, one_line=True)), partial(self.use, name), text=name)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name in self.themes():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, highlight_literally(matcher, name), partial(self.use, name), text=name)
