"""The chat app: tabs of conversations beside the live stats panel, the command palette, themes.

``make_app`` builds it the same way for the terminal, headless mode and tests. The App only wires
things together; each tab runs its own turns (``widgets/chat_tab.py``), dialogs are in ``screens/``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from textual import events
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.theme import Theme
from textual.widgets import Footer, Header

from chatkv.config import Settings
from chatkv.conversation import Conversation, new_session_id
from chatkv.crash import write_crash_log
from chatkv.engine.api import EngineError, Sampling
from chatkv.store import ConversationStore, StoreError
from chatkv.tui.commands import ChatCommands, ThemeCommands
from chatkv.tui.keys import APP_BINDINGS
from chatkv.tui.relay import AppRelay
from chatkv.tui.screens.confirm_close import CloseChoice, ConfirmCloseScreen
from chatkv.tui.screens.dialog import ChatCommandPalette
from chatkv.tui.screens.generation import GenerationScreen
from chatkv.tui.screens.new_tab import NewTabRequest, NewTabScreen
from chatkv.tui.screens.rename_tab import RenameTabScreen
from chatkv.tui.themes import builtin_themes_dir, load_themes
from chatkv.tui.widgets.chat_tab import ChatTab, TurnRefused
from chatkv.tui.widgets.chat_view import ChatView
from chatkv.tui.widgets.chat_tabs import ChatTabs
from chatkv.tui.widgets.stats_panel import StatsPanel
from chatkv.tui.widgets.text_fields import SafeInput, SafeTextArea
from chatkv.visible_text import visible

SAFE_FIELDS = (SafeInput, SafeTextArea)  # text fields that never draw a control character

STATS_REFRESH_SECONDS = 0.25
STATS_IDLE_EVERY = 8  # while nothing runs, refresh every 8th tick (2 s): figures only change with turns
WIDE_ENOUGH_FOR_STATS = 120
FALLBACK_THEME = "textual-dark"
TAB_ACTIONS = {"new_tab", "generation_settings", "close_tab", "rename_tab", "next_tab", "previous_tab", "stop_reply", "copy_reply", "copy_code",
               "scroll_history", "regenerate", "edit_message", "fork_tab"}
GREEDY_REGENERATE_NOTE = ("Greedy decoding (temperature 0) writes the same reply again for the same conversation; "
                          "raise the tab's temperature (Ctrl+P, Generation settings) for a different one.")


def describe_sampling(sampling: Sampling) -> str:
    """'temperature 0.2 · top-p 0.9 · repetition penalty 1.1 · up to 512 tokens', or 'greedy · up to 512 tokens'."""
    if sampling.greedy:
        return f"greedy · up to {sampling.max_new_tokens} tokens"
    return (f"temperature {sampling.temperature:g} · top-p {sampling.top_p:g} · repetition penalty "
            f"{sampling.repetition_penalty:g} · up to {sampling.max_new_tokens} tokens")


@dataclass
class AppOptions:
    restore_tabs: bool = True  # reopen last launch's tabs (and open a fresh one if none come back)
    new_tab: bool = False  # --new: a fresh tab beside the restored ones
    persist: bool = True  # False (--ephemeral): conversations opened here are never written
    remember_layout: bool = True  # save open tabs, active tab and theme for the next launch
    theme: str | None = None  # --theme: wins over the remembered choice
    on_shown: Callable[[], object] | None = None  # called once the app is up (the terminal UI starts loading the model)


class ChatApp(App[int]):
    TITLE = "chatkv"
    COMMANDS = App.COMMANDS | {ChatCommands}
    # Text fields and lists never get narrower than a few cells, in our screens and in the palette: at 0 cells
    # wide a placeholder cannot be wrapped and Textual raises. Narrower than that, they are clipped.
    # The stats panel leaves the chat at least half the width, however narrow the terminal.
    CSS = """
    #main { height: 1fr; }
    #main > StatsPanel { dock: right; max-width: 50%; }
    TextArea, Input { min-width: 10; }
    OptionList { min-width: 16; }
    /* notices at the top right, over the history: never over the message box */
    ToastRack { dock: top; align: right top; margin-top: 1; margin-bottom: 0; }
    """
    BINDINGS = APP_BINDINGS

    def __init__(self, settings: Settings, engine, store: ConversationStore, themes: list[Theme],
                 theme_problems: list[str], options: AppOptions) -> None:
        super().__init__()
        self.settings = settings
        self.engine = engine
        self.store = store
        self.options = options
        # shown once the app runs: all skipped theme files in one notification, then any other startup notes
        self.startup_notes = ["Theme files skipped:\n" + "\n".join(theme_problems)] if theme_problems else []
        for theme in themes:
            self.register_theme(theme)
        self._stats_ticks = 0
        self._stats_toggled_by_user = False
        self._default_sampling: Sampling | None = None  # worked out on first use, again once the model is loaded
        # notes and progress from the engine's and the loader's threads reach the app through this, and only this
        self.relay = AppRelay()
        # told of every problem the user is shown (headless mode turns them into error events): (session id or None, message)
        self.problem_listeners: list[Callable[[str | None, str], None]] = []
        # set by the first uncaught error: the error, its log file, and the sessions whose KV to snapshot on the way out
        self.crash: BaseException | None = None
        self.crash_log: Path | None = None
        self.crash_session_ids: list[str] = []

    # layout --------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # held as attributes, not queried: the app's queries only see the top screen, which may be a dialog
        self.chat_tabs = ChatTabs(id="chats")
        self.stats_panel = StatsPanel()
        yield Header()
        with Horizontal(id="main"):
            yield self.chat_tabs
            yield self.stats_panel
        yield Footer()

    async def on_mount(self) -> None:
        state = self.store.load_state(self.startup_notes)
        self._apply_theme(self.options.theme or state.get("theme") or self.settings.ui.theme)
        self.theme_changed_signal.subscribe(self, lambda _theme: self.save_layout())
        self._place_stats_panel(self.size.width)
        if self.options.restore_tabs:
            await self._restore_tabs(state)
        for note in self.startup_notes:
            self.notify(note, severity="warning", timeout=10)
        self.set_interval(STATS_REFRESH_SECONDS, self.refresh_stats)
        self.refresh_stats(force=True)
        self.relay.open(asyncio.get_running_loop())
        if self.options.on_shown is not None:
            self.options.on_shown()

    def on_unmount(self) -> None:
        self.relay.close()

    def show_model_progress(self, message: str) -> None:
        """While the model loads behind the app (terminal UI): its progress, in the title bar (on the app's thread)."""
        self.sub_title = visible(message, one_line=True)

    def model_loaded(self, error: str | None) -> None:
        """The model finished loading (``error`` None) or failed; tabs still on the old defaults take the model's."""
        if error is not None:
            self.sub_title = "the model did not load: chats can be read, not continued"
            self.report_problem(error)
            return
        before, self._default_sampling = self._default_sampling, None
        after = self.default_sampling()
        for tab in self.chat_tabs.chat_tabs:
            if tab.sampling == before and not tab.conversation.sampling:  # settings of its own stay as chosen
                tab.sampling = after
        self.refresh_stats(force=True)

    def _apply_theme(self, name: str) -> None:
        if name in self.available_themes:
            self.theme = name
            return
        self.startup_notes.append(f"Theme {name!r} not found; using {FALLBACK_THEME}. The command palette lists the themes.")
        self.theme = FALLBACK_THEME

    async def _restore_tabs(self, state: dict) -> None:
        opened = 0
        for session_id in state.get("open_tabs", []):
            try:
                await self.open_conversation(self.store.get(session_id), activate=False)
                opened += 1
            except StoreError as exc:
                self.startup_notes.append(f"A tab from last time could not be reopened: {exc}")
        active = self.chat_tabs.find(state.get("active_tab") or "")
        if active is not None:
            self.chat_tabs.activate(active)
        if self.options.new_tab or opened == 0:
            await self.open_new_conversation()

    # tabs ----------------------------------------------------------------------------------------
    def default_sampling(self) -> Sampling:
        """New tabs' generation settings: config.toml's, else the model's own, else the fallback (``config.py``)."""
        if self._default_sampling is not None:
            return self._default_sampling
        generation = self.settings.generation
        self._default_sampling = Sampling(max_new_tokens=generation.max_new_tokens, temperature=generation.sampling_value("temperature"),
                        top_p=generation.sampling_value("top_p"),
                        repetition_penalty=generation.sampling_value("repetition_penalty"),
                        max_time_ms=generation.max_time_ms)
        return self._default_sampling

    def report_problem(self, message: str, session_id: str | None = None, severity: str = "error") -> None:
        """Show a problem the user should know about, and tell whoever listens (headless mode)."""
        self.notify(message, severity=severity, timeout=10)
        for listener in self.problem_listeners:
            listener(session_id, message)

    def save_conversation(self, conversation: Conversation) -> None:
        try:
            self.store.save(conversation)
        except StoreError as exc:
            self.report_problem(str(exc), conversation.id)

    async def open_conversation(self, conversation: Conversation, activate: bool = True, persist: bool | None = None,
                                sampling: Sampling | None = None) -> ChatTab:
        """Show a conversation in a tab (the one already showing it, if any); ``sampling``: its generation settings."""
        existing = self.chat_tabs.find(conversation.id)
        if existing is not None:
            self.chat_tabs.activate(existing)
            return existing
        persist = self.options.persist if persist is None else persist
        save = self.save_conversation if persist else (lambda _conversation: None)
        tab = ChatTab(conversation, self.engine, save, sampling or self._saved_sampling(conversation) or self.default_sampling(),
                      persisted=persist)
        if conversation.model and self.engine.capabilities.server_models:  # the server's model chosen for it last time
            self.engine.set_model(conversation.id, conversation.model)
        await self.chat_tabs.add(tab, activate=activate)
        self.save_layout()
        return tab

    def _saved_sampling(self, conversation: Conversation) -> Sampling | None:
        """The generation settings saved with ``conversation``, if any and valid (else the defaults, saying so)."""
        if not conversation.sampling:
            return None
        try:
            sampling = Sampling(**conversation.sampling)
            sampling.validate()
            return sampling
        except (TypeError, EngineError) as exc:
            self.report_problem(f"The generation settings saved with {conversation.name!r} cannot be used ({exc}); "
                                "it uses the defaults until you set its own (palette: Generation settings).",
                                conversation.id, severity="warning")
            return None

    async def open_new_conversation(self, name: str = "", system: str | None = None, session_id: str | None = None,
                                    sampling: Sampling | None = None) -> ChatTab:
        conversation = self.store.new_conversation(name or None, self.settings.generation.system_prompt if system is None else system)
        if session_id:
            conversation.id = session_id
        if sampling is not None and sampling != self.default_sampling():  # chosen in the new-tab dialog: kept with it
            conversation.sampling = dataclasses.asdict(sampling)
        tab = await self.open_conversation(conversation, sampling=sampling)
        tab.save()  # saved at once, so the tab comes back even before its first message
        self.save_layout()
        return tab

    async def open_saved(self, session_id: str) -> None:
        try:
            await self.open_conversation(self.store.get(session_id))
        except StoreError as exc:
            self.report_problem(str(exc), session_id)

    async def closed_conversations(self) -> list[Conversation]:
        conversations, set_aside = await asyncio.to_thread(self.store.load_all)
        for message in set_aside:
            self.report_problem(message, severity="warning")
        open_ids = {tab.session_id for tab in self.chat_tabs.chat_tabs}
        return [conversation for conversation in conversations if conversation.id not in open_ids]

    async def close_tab(self, tab: ChatTab, choice: CloseChoice = CloseChoice.CLOSE) -> None:
        """Close a tab; a reply being written is stopped and saved first. DELETE also drops the conversation and its KV."""
        if tab.stop():
            await asyncio.wait([asyncio.create_task(tab.wait_for_turn())], timeout=5)
        await self.chat_tabs.close(tab)
        if choice is CloseChoice.DELETE or not tab.persisted:
            await asyncio.to_thread(self.engine.forget, tab.session_id)
        if choice is CloseChoice.DELETE:
            try:
                self.store.delete(tab.session_id)
            except StoreError as exc:
                self.report_problem(str(exc), tab.session_id)
        if self.options.restore_tabs and not self.chat_tabs.chat_tabs:
            await self.open_new_conversation()
        self.save_layout()

    def save_layout(self) -> None:
        if not self.options.remember_layout or not self.chat_tabs.is_mounted:
            return
        if not self.chat_tabs.chat_tabs:
            return  # the app is shutting down (a running app always shows a tab): keep the last layout
        tabs = [tab for tab in self.chat_tabs.chat_tabs if tab.persisted]
        current = self.chat_tabs.current
        state = {"open_tabs": [tab.session_id for tab in tabs],
                 "active_tab": current.session_id if current in tabs else None, "theme": self.theme}
        try:
            self.store.save_state(state)
        except StoreError as exc:
            self.report_problem(str(exc))

    def on_tabbed_content_tab_activated(self, event: ChatTabs.TabActivated) -> None:
        self.save_layout()
        self.refresh_stats(force=True)

    def on_chat_tab_busy_changed(self, event: ChatTab.BusyChanged) -> None:
        if self.screen_stack:  # empty once the app is shutting down
            self.refresh_bindings()
            self.refresh_stats(force=True)

    # actions ---------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in TAB_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        if action == "stop_reply":
            current = self.chat_tabs.current if self.chat_tabs.is_mounted else None
            return True if current is not None and current.generating else None
        return True

    def action_new_tab(self) -> None:
        async def create(request: NewTabRequest | None) -> None:
            if request is not None:
                tab = await self.open_new_conversation(request.name, request.system, sampling=request.sampling)
                # after the dialog has gone, or the screen gives focus back to the input it had before
                self.call_after_refresh(tab.focus_input)

        self.push_screen(NewTabScreen(self.settings.generation.system_prompt, self.default_sampling()), create)

    def action_generation_settings(self) -> None:
        tab = self.chat_tabs.current
        if tab is None:
            return

        def apply(sampling: Sampling | None) -> None:
            if sampling is not None and tab.is_attached:
                tab.sampling = sampling
                tab.conversation.sampling = dataclasses.asdict(sampling)  # saved with the conversation
                tab.save()
                self.notify(f"{tab.conversation.name!r}: {describe_sampling(sampling)} from its next reply on.", timeout=4)

        self.push_screen(GenerationScreen(tab.conversation.name, tab.sampling), apply)

    def action_close_tab(self) -> None:
        tab = self.chat_tabs.current
        if tab is None:
            return

        async def close(choice: CloseChoice | None) -> None:
            if choice is not None and tab.is_attached:
                await self.close_tab(tab, choice)

        self.push_screen(ConfirmCloseScreen(tab.conversation.name, tab.generating), close)

    def action_rename_tab(self) -> None:
        tab = self.chat_tabs.current
        if tab is None:
            return

        def rename(name: str | None) -> None:
            if name and tab.is_attached:
                tab.conversation.name = name
                tab.save()
                self.chat_tabs.relabel(tab)

        self.push_screen(RenameTabScreen(tab.conversation.name), rename)

    def action_stop_reply(self) -> None:
        tab = self.chat_tabs.current
        if tab is not None and tab.stop():
            self.notify("Stopping the reply; what was written is kept.", timeout=3)

    def action_regenerate(self) -> None:
        tab = self.chat_tabs.current
        if tab is None:
            return
        try:
            tab.regenerate()
        except TurnRefused as exc:
            self.notify(str(exc), severity="warning")
            return
        if tab.sampling.greedy:
            self.notify(GREEDY_REGENERATE_NOTE, timeout=6)

    def action_edit_message(self) -> None:
        """Edit the message highlighted in the chat view, or else the last message the user sent."""
        tab = self.chat_tabs.current
        if tab is None:
            return
        messages = tab.conversation.messages
        index = tab.chat_view.selected
        if index is None or not 0 <= index < len(messages) or messages[index].role != "user":
            index = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
        if index is None:
            self.notify("There is no message to edit yet.", severity="warning")
            return
        tab.ask_to_edit(index)

    async def action_fork_tab(self) -> None:
        """Fork the current tab at the message highlighted in the chat view, or else at its last message."""
        tab = self.chat_tabs.current
        if tab is None:
            return
        index = tab.chat_view.selected
        if index is None or not 0 <= index < len(tab.conversation.messages):
            index = len(tab.conversation.messages) - 1
        await self.fork_at(tab, index)

    async def on_chat_view_fork_requested(self, event: ChatView.ForkRequested) -> None:
        tab = self.chat_tabs.current
        if tab is not None:
            await self.fork_at(tab, event.index)

    async def fork_at(self, tab: ChatTab, index: int) -> ChatTab | None:
        try:
            child = await self.fork_tab(tab, index)
        except TurnRefused as exc:
            self.notify(str(exc), severity="warning")
            return None
        self.call_after_refresh(child.focus_input)
        return child

    async def fork_tab(self, tab: ChatTab, index: int, session_id: str | None = None, name: str | None = None) -> ChatTab:
        """Open a new tab holding messages 0..``index`` of ``tab`` (0-based, system prompt excluded), saved with its origin.

        The new tab shares the parent's KV blocks (``Engine.fork_kv``), so its first turn prefills
        only what follows the shared prefix. Raises ``TurnRefused`` for a position the tab does not have,
        or a ``session_id`` that is already in use; nothing changes then.
        """
        parent = tab.conversation
        if not 0 <= index < len(parent.messages):
            raise TurnRefused(f"There is no message {index} to fork at: this conversation has messages 0 to "
                              f"{len(parent.messages) - 1}." if parent.messages else "There is nothing to fork yet: send a message first.")
        session_id = session_id or new_session_id()
        if self.chat_tabs.find(session_id) is not None:
            raise TurnRefused(f"A tab with id {session_id!r} is already open.")
        if self.options.persist and self.store.session_file(session_id).exists():
            raise TurnRefused(f"A saved conversation with id {session_id!r} exists already; pick another id.")
        child = parent.fork(index, session_id, name or self._fork_name(parent.name))
        shared = await asyncio.to_thread(self.engine.fork_kv, tab.session_id, session_id)
        new_tab = await self.open_conversation(child, persist=tab.persisted and self.options.persist)
        new_tab.save()
        self.save_layout()
        kv = f"{shared:,} tokens of KV shared with it" if shared else "its KV was not in memory, so the first turn recomputes it"
        self.notify(f"Forked {parent.name!r} at message {index}: {kv}.", timeout=5)
        return new_tab

    def _fork_name(self, name: str) -> str:
        taken = {tab.conversation.name for tab in self.chat_tabs.chat_tabs}
        candidate, number = f"{name} (fork)", 2
        while candidate in taken:
            candidate, number = f"{name} (fork {number})", number + 1
        return candidate

    def action_next_tab(self) -> None:
        self.chat_tabs.step(1)

    def action_previous_tab(self) -> None:
        self.chat_tabs.step(-1)

    def action_scroll_history(self, where: str) -> None:
        """PgUp/PgDn and Ctrl+Home/End in the message box move the current tab's history: page_up, page_down, top, bottom."""
        tab = self.chat_tabs.current
        if tab is not None:
            tab.chat_view.scroll_to_place(where)

    def action_copy_reply(self) -> None:
        """Copy the current tab's last reply to the clipboard (OSC 52: the terminal must allow it; tmux needs set-clipboard on)."""
        tab = self.chat_tabs.current
        reply = tab.chat_view.last_reply_text() if tab is not None else None
        if not reply:
            self.notify("No reply to copy in this tab yet.", severity="warning", timeout=3)
            return
        self.copy_to_clipboard(reply)
        self.notify(f"Copied the last reply ({len(reply)} characters).", timeout=3)

    def action_copy_code(self) -> None:
        """Copy the last code block of the current tab's replies to the clipboard."""
        tab = self.chat_tabs.current
        code = tab.chat_view.last_code_block() if tab is not None else None
        if code is None:
            self.notify("No code block in this tab's replies.", severity="warning", timeout=3)
            return
        self.copy_to_clipboard(code)
        self.notify(f"Copied the last code block ({len(code.splitlines())} lines).", timeout=3)

    def action_toggle_stats(self) -> None:
        self._stats_toggled_by_user = True
        self.stats_panel.display = not self.stats_panel.display
        self.refresh_stats(force=True)

    def action_command_palette(self) -> None:
        """Textual's palette, as a screen that is dismissed once (``chatkv.tui.screens.dialog``)."""
        if self.use_command_palette and not ChatCommandPalette.is_open(self):
            self.push_screen(ChatCommandPalette(id="--command-palette"))

    def search_themes(self) -> None:
        """The palette's 'Theme' command: Textual's theme list, with user theme names shown literally."""
        self.push_screen(ChatCommandPalette(providers=[ThemeCommands], placeholder="Search for themes…"))

    async def action_save_snapshots(self) -> None:
        if not self.engine.capabilities.holds_kv:  # a remote server (--backend) holds the KV
            self.notify("The server holds the KV cache; chatkv has none to save. Conversations are saved as you go.")
            return
        written = await asyncio.to_thread(self.engine.snapshot, self.persisted_session_ids())
        self.notify(f"Saved the KV cache of {written} session(s) to disk.")

    async def action_quit(self) -> None:
        """Stop running replies and let their tabs save what was written, write the KV snapshots, then leave.

        A message still waiting for the model to load stays saved in its conversation as sent (Ctrl+G answers it
        next time): there is nothing to stop or wait for.
        """
        running = [tab for tab in self.chat_tabs.chat_tabs if tab.generating and not tab.waiting_for_model]
        for tab in running:
            tab.stop()
        if running:
            await asyncio.wait([asyncio.create_task(tab.wait_for_turn()) for tab in running], timeout=5)
        await asyncio.to_thread(self.engine.snapshot, self.persisted_session_ids())
        self.exit(0)

    def _handle_exception(self, error: Exception) -> None:
        """Textual's hook for an uncaught error: log the traceback to a file and save every conversation.

        Textual then exits the app with return code 1. Its own traceback, printed to the terminal on the
        way out, is dropped: the caller prints one line naming the log file (``chatkv.crash``).
        """
        if self.crash is None:
            self.crash = error
            self.crash_log = write_crash_log(self.store.paths.data, error)
            self.crash_session_ids = self._save_all_after_crash()
        super()._handle_exception(error)
        self._exit_renderables.clear()

    def _save_all_after_crash(self) -> list[str]:
        """Save each open conversation as it stands; the ids of those persisted (their KV is snapshotted later)."""
        saved: list[str] = []
        try:
            tabs = self.chat_tabs.chat_tabs
        except Exception:  # the widget tree itself may be what broke
            return saved
        for tab in tabs:
            if not tab.persisted:
                continue
            try:
                self.store.save(tab.conversation)
                saved.append(tab.session_id)
            except Exception:  # one conversation that cannot be saved must not stop the others
                continue
        return saved

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Paste) and not event.is_forwarded and not isinstance(self.focused, SAFE_FIELDS):
            # a paste into a field of Textual's own (the palette's search) that would draw control characters as
            # they are: they arrive as visible stand-ins instead (our own fields keep them, never drawing them)
            event = events.Paste(visible(event.text))
        await super().on_event(event)

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every notification shows its text literally: messages quote names, paths and errors that may hold ``[``."""
        super().notify(visible(message), title=visible(title, one_line=True), severity=severity, timeout=timeout,
                       markup=False)

    def report_from_engine(self, message: str) -> None:
        """A note from the engine (a snapshot ignored, a kernel being built), on the app's thread (``self.relay``)."""
        self.notify(message, severity="warning", timeout=8)

    async def server_models(self) -> list[str]:
        """A remote server's models for the palette (asked again if the server was not reachable before); [] locally."""
        if not self.engine.capabilities.server_models:
            return []
        return self.engine.models() or await asyncio.to_thread(self.engine.refresh_models)

    def use_model(self, model: str) -> None:
        """A remote server: answer the current tab with ``model`` from now on (remembered with the conversation)."""
        tab = self.chat_tabs.current
        if tab is not None:
            tab.conversation.model = model
            tab.save()
            self.engine.set_model(tab.session_id, model)
            self.notify(f"This tab's next replies come from {model}.", timeout=4)
            self.refresh_stats(force=True)

    def persisted_session_ids(self) -> list[str]:
        return [tab.session_id for tab in self.chat_tabs.chat_tabs if tab.persisted]

    # stats panel -----------------------------------------------------------------------------------
    def _place_stats_panel(self, width: int) -> None:
        choice = self.settings.ui.stats_panel
        self.stats_panel.display = choice == "show" or (choice == "auto" and width >= WIDE_ENOUGH_FOR_STATS)

    def on_resize(self, event: events.Resize) -> None:
        # the event's size: this handler runs before Textual's own, so ``self.size`` still has the old one
        if not self._stats_toggled_by_user and self.stats_panel.is_mounted:
            self._place_stats_panel(event.size.width)
            self.refresh_stats(force=True)

    def refresh_stats(self, force: bool = False) -> None:
        """Several times a second while any tab is writing; every couple of seconds otherwise."""
        panel = self.stats_panel
        if not panel.display:
            return
        self._stats_ticks += 1
        busy = any(tab.generating for tab in self.chat_tabs.chat_tabs)
        if not (force or busy or self._stats_ticks >= STATS_IDLE_EVERY):
            return
        self._stats_ticks = 0
        current = self.chat_tabs.current
        session = self.engine.session_stats(current.session_id) if current else None
        last_reply = next((message.stats for message in reversed(current.conversation.messages)
                           if message.role == "assistant" and message.stats), None) if current else None
        ready = 0
        for tab in self.chat_tabs.chat_tabs:
            tab_session = session if tab is current else self.engine.session_stats(tab.session_id)
            ready += tab_session is not None and not tab_session.resident and tab_session.on_disk_bytes > 0
        panel.show_stats(self.engine.stats(), session, last_reply, ready)


def make_app(settings: Settings, engine, store: ConversationStore, user_themes_dir: Path | None,
             options: AppOptions | None = None) -> ChatApp:
    """Build the app: load the theme files (problems are shown once the app runs), nothing else happens yet."""
    themes, problems = load_themes(builtin_themes_dir(), user_themes_dir)
    return ChatApp(settings, engine, store, themes, problems, options or AppOptions())
