"""A remote server that refuses, breaks, stops or never answers: each ends the turn with a clear message, keeps
the partial reply, loses nothing, and the next send works once the server does.

These use ``fake_openai_server.FakeServer``, which misbehaves on cue; the main path runs against llama.cpp's
real server in ``test_remote_llama_server.py``.
"""

from __future__ import annotations

import socket

import pytest

from chatkv.config import BackendOptions, Settings
from chatkv.conversation import Message
from chatkv.engine.api import Sampling
from chatkv.paths import Paths
from chatkv.remote.backend import RemoteBackend
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from chatkv.tui.widgets.messages import AssistantReply, ChatNote
from fake_openai_server import MODEL, PARTIAL, FakeServer

HELLO = [Message("user", "hello")]


@pytest.fixture
def server():
    with FakeServer() as fake:
        yield fake


def backend_for(url: str, read_timeout_s: float = 10.0, key: str | None = None) -> RemoteBackend:
    options = BackendOptions(url=url, read_timeout_s=read_timeout_s, connect_timeout_s=2.0, metrics=False)
    return RemoteBackend(options, api_key=key).start()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


def one_turn(backend: RemoteBackend, session: str = "s1"):
    return backend.submit(session, HELLO, Sampling(max_new_tokens=8)).wait(30)


@pytest.mark.parametrize("status, says", [
    ("401", "refused the API key (401)"),
    ("403", "does not allow this request (403)"),
    ("404", "has no model 'fake-model' (404)"),
    ("429", "rate limiting (429)"),
    ("500", "server failed (500)"),
    ("503", "server failed (503)"),
])
def test_a_refused_request_fails_the_turn_with_the_status_and_what_to_do(server, status, says):
    with backend_for(server.url) as backend:
        assert backend.probe() == []
        server.mode = status
        result = one_turn(backend)
        assert result.finish_reason == "error"
        assert says in result.error
        assert "the server said:" in result.error  # the server's own explanation comes along
        if status == "429":
            assert "wait 7 s" in result.error  # Retry-After is passed on
        server.mode = "ok"
        retried = one_turn(backend)  # a retry after the server recovers just works
        assert retried.finish_reason == "stop" and retried.reply == "".join(PARTIAL)


def test_an_unknown_model_is_named_at_launch_with_the_models_the_server_has(server):
    options = BackendOptions(url=server.url, model="no-such-model", metrics=False)
    with RemoteBackend(options).start() as backend:
        [note] = backend.probe()
        assert "'no-such-model'" in note and MODEL in note


def test_the_api_key_comes_from_the_environment_and_is_sent_as_a_bearer_token(server, monkeypatch):
    from chatkv.remote.backend import api_key_from_env

    monkeypatch.setenv("MY_SERVER_KEY", "sk-test-123")
    with backend_for(server.url, key=api_key_from_env("MY_SERVER_KEY")) as backend:
        one_turn(backend)
    assert server.requests[-1]["authorization"] == "Bearer sk-test-123"


def test_a_stream_that_stops_mid_reply_keeps_the_partial_reply_and_says_so(server):
    server.mode = "drop"
    with backend_for(server.url) as backend:
        result = one_turn(backend)
    assert result.finish_reason == "error"
    assert result.reply == "".join(PARTIAL)  # what arrived is kept
    assert "before the reply was finished" in result.error or "broke in the middle" in result.error
    assert "characters received before the failure" in result.error


def test_an_error_inside_the_stream_is_reported_with_the_servers_words(server):
    server.mode = "error-event"
    with backend_for(server.url) as backend:
        result = one_turn(backend)
    assert result.finish_reason == "error" and "ran out of KV blocks" in result.error
    assert result.reply == "".join(PARTIAL)


def test_a_server_that_never_answers_times_out_with_a_message(server):
    server.mode = "hang"
    with backend_for(server.url, read_timeout_s=1.0) as backend:
        result = one_turn(backend)
    assert result.finish_reason == "error"
    assert "sent nothing for 1 s" in result.error and "read_timeout_s" in result.error


def test_a_server_not_running_at_launch_is_reported_and_the_first_send_after_it_starts_works():
    url = closed_port_url()
    options = BackendOptions(url=url, connect_timeout_s=2.0, metrics=False)
    with RemoteBackend(options).start() as backend:
        [note] = backend.probe()
        assert "Cannot reach the server" in note and url in note
        result = one_turn(backend)
        assert result.finish_reason == "error" and "Cannot reach the server" in result.error


def test_a_server_that_goes_away_mid_session_fails_the_next_turn_with_a_message():
    server = FakeServer().__enter__()
    backend = backend_for(server.url)
    try:
        assert one_turn(backend).finish_reason == "stop"
        server.stop()
        result = one_turn(backend)
        assert result.finish_reason == "error"
        assert "Cannot reach the server" in result.error
    finally:
        backend.close()


def test_a_url_that_is_not_http_is_refused_with_an_example():
    from chatkv.engine.api import EngineError

    with pytest.raises(EngineError, match="http://127.0.0.1:8000/v1"):
        RemoteBackend(BackendOptions(url="localhost:8000"))


def test_a_server_that_reports_no_cache_figures_gives_none_never_zero(server):
    with backend_for(server.url) as backend:
        result = one_turn(backend)
        assert result.prompt_tokens == 12
        assert result.reused_tokens is None and result.prefilled_tokens is None
        assert result.reused_from == "server" and result.batch_size is None
        assert backend.stats().prompt_tokens == 0  # the hit rate covers only turns the server reported


# in the app ---------------------------------------------------------------------------------------------

async def test_in_the_app_a_failed_turn_shows_why_keeps_the_partial_reply_and_gives_the_text_back(server, data_dir):
    paths = Paths.resolve(data_dir)
    store = ConversationStore(paths)
    settings = Settings()
    with backend_for(server.url) as backend:
        app = make_app(settings, backend, store, paths.user_themes, AppOptions())
        async with app.run_test(size=(130, 40)) as pilot:
            tab = app.chat_tabs.current
            server.mode = "drop"
            await pilot.press(*"hello", "enter")
            outcome = await tab.wait_for_turn()
            assert outcome.error is not None
            [reply] = tab.chat_view.query(AssistantReply)
            assert reply.text == "".join(PARTIAL)
            assert "failed" in reply.query_one(".reply-footer").render().plain  # marked
            notes = [str(note.render()) for note in tab.chat_view.query(ChatNote)]
            assert any("before the reply was finished" in note or "broke in the middle" in note for note in notes)
            assert tab.prompt_input.text == "hello"  # nothing lost: Enter retries
            assert tab.conversation.messages == []
            server.mode = "ok"
            await pilot.press("enter")
            outcome = await tab.wait_for_turn()
            assert outcome.error is None
            assert [m.content for m in tab.conversation.messages] == ["hello", "".join(PARTIAL)]
            footer = tab.chat_view.query(AssistantReply).last().query_one(".reply-footer").render().plain
            assert "cache use not reported by the server" in footer
