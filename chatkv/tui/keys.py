"""Every key the chat app binds, in one place, with the reasons behind the choices.

Chosen to arrive intact in common terminals (xterm, GNOME Terminal/VTE, kitty, Windows Terminal, and
tmux with its default ``xterm-keys``): plain keys, Ctrl+letter, function keys, and Ctrl or Alt with
the arrow and page keys. Not used: Alt+digit (macOS terminals type characters such as ``¡`` and ``™``
for Option+1/2, and an ESC prefix can split it), Ctrl+digit and Ctrl+Tab (most terminals send nothing
distinct for them).

The message box is a Textual ``TextArea``, whose editing keys follow readline where they can: Ctrl+W
and Alt+Backspace delete the word before the cursor, Ctrl+U and Ctrl+K delete to the start and end of
the line, Ctrl+A/Ctrl+E go to its start and end, F7 selects everything. So no app key takes any of
them: closing a tab is F4. The history scrolls from the message box: PgUp/PgDn page through it,
Ctrl+Home/Ctrl+End jump to its top and bottom (the message box is at most ten lines high, so it never
needs PgUp/PgDn of its own). Ctrl+G (regenerate the last reply) is free in the TextArea and in
readline-style editing alike. The keys that act on one message (E or Enter to edit and resend, F to
fork) are plain letters, so they are bound on the chat history only, never on the message box.

The README's key table lists the same keys; ``tests/test_tui_keys.py`` holds them to it.
"""

from __future__ import annotations

from textual.binding import Binding

APP_BINDINGS = [
    Binding("ctrl+t", "new_tab", "New tab", id="new_tab"),
    Binding("f4", "close_tab", "Close tab", id="close_tab"),
    Binding("ctrl+r", "rename_tab", "Rename", id="rename_tab"),
    Binding("escape", "stop_reply", "Stop reply", id="stop_reply"),
    Binding("ctrl+g", "regenerate", "Regenerate", id="regenerate"),
    Binding("ctrl+pagedown,alt+right", "next_tab", "Next tab", id="next_tab", show=False, priority=True),
    Binding("ctrl+pageup,alt+left", "previous_tab", "Previous tab", id="previous_tab", show=False, priority=True),
    Binding("f3", "copy_reply", "Copy reply", id="copy_reply"),
    Binding("f5", "copy_code", "Copy code", id="copy_code", show=False),
    Binding("f2", "toggle_stats", "Stats", id="toggle_stats"),
]
"""The app's own keys; the footer shows those with ``show=True``."""

HISTORY_BINDINGS = [
    Binding("pageup,shift+pageup", "app.scroll_history('page_up')", "Scroll up", id="history_page_up", show=False),
    Binding("pagedown,shift+pagedown", "app.scroll_history('page_down')", "Scroll down", id="history_page_down", show=False),
    Binding("ctrl+home", "app.scroll_history('top')", "Top of chat", id="history_top", show=False),
    Binding("ctrl+end", "app.scroll_history('bottom')", "Bottom of chat", id="history_bottom", show=False),
]
"""Bound on the message box, where they win over the TextArea's own PgUp/PgDn cursor moves."""

CHAT_VIEW_BINDINGS = [
    Binding("up", "select(-1)", "Previous message", show=False),
    Binding("down", "select(1)", "Next message", show=False),
    Binding("home", "select_at(0)", "First message", show=False),
    Binding("end", "select_at(-1)", "Last message", show=False),
    Binding("e,enter", "edit_selected", "Edit & resend", id="edit_message"),
    Binding("f", "fork_selected", "Fork here", id="fork_message"),
]
"""Bound on the chat history (reached with Tab / Shift+Tab from the message box, or a click on a message):
↑/↓, Home/End pick a message; the picked one is edited and resent or forked into a new tab."""

NEW_TAB_DIALOG_BINDINGS = [
    Binding("ctrl+s", "create", "Create", id="dialog.create", priority=True),
    Binding("escape", "cancel", "Cancel", id="dialog.cancel"),
]
"""In the new-tab dialog, Enter in a one-line box also creates; in the system prompt it adds a line."""
