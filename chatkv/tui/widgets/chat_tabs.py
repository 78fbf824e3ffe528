"""The row of chat tabs: add, close, rename, step through, and a dot on tabs that are writing a reply."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import TabbedContent

from chatkv.tui.widgets.chat_tab import ChatTab, pane_id
from chatkv.visible_text import visible

BUSY_MARK = "● "


class ChatTabs(TabbedContent):
    DEFAULT_CSS = """
    ChatTabs { height: 1fr; width: 1fr; }
    ChatTabs > ContentSwitcher { height: 1fr; }
    """

    @property
    def chat_tabs(self) -> list[ChatTab]:
        return list(self.query(ChatTab))

    @property
    def current(self) -> ChatTab | None:
        # found by id rather than through active_pane, which raises while the app is tearing the tabs down
        active = self.active
        for tab in self.chat_tabs:
            if tab.id == active:
                return tab
        return None

    def find(self, session_id: str) -> ChatTab | None:
        for tab in self.chat_tabs:
            if tab.session_id == session_id:
                return tab
        return None

    async def add(self, tab: ChatTab, activate: bool = True) -> ChatTab:
        await self.add_pane(tab)
        if activate:
            self.activate(tab)
        return tab

    def activate(self, tab: ChatTab) -> None:
        self.active = pane_id(tab.session_id)
        tab.focus_input()

    async def close(self, tab: ChatTab) -> None:
        await self.remove_pane(pane_id(tab.session_id))
        current = self.current
        if current is not None:
            current.focus_input()

    def relabel(self, tab: ChatTab) -> None:
        mark = BUSY_MARK if tab.generating else ""
        self.get_tab(pane_id(tab.session_id)).label = Content(mark + visible(tab.conversation.name, one_line=True))

    def step(self, offset: int) -> None:
        """Activate the tab ``offset`` places to the right (negative: left), wrapping around."""
        tabs = self.chat_tabs
        current = self.current
        if not tabs or current is None:
            return
        index = (tabs.index(current) + offset) % len(tabs)
        self.activate(tabs[index])

    def on_chat_tab_busy_changed(self, event: ChatTab.BusyChanged) -> None:
        if event.tab.is_attached:
            self.relabel(event.tab)
