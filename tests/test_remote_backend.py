"""Choosing a remote server: flags and config, the API key kept out of every file, the palette's model switch.

The server is ``fake_openai_server.FakeServer`` (these tests are about chatkv's side); the real-server path
is in ``test_remote_llama_server.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chatkv.cli import build_parser, make_context
from chatkv.config import BackendOptions, Settings
from chatkv.paths import Paths
from chatkv.remote.backend import RemoteBackend
from chatkv.store import ConversationStore
from chatkv.tui.app import AppOptions, make_app
from fake_openai_server import MODEL, OTHER_MODEL, FakeServer

CHATKV = Path(sys.executable).parent / "chatkv"


def test_backend_flags_and_config_choose_the_server_and_its_model(tmp_path, data_dir):
    args = build_parser().parse_args(["launch", "--backend", "http://h:8000/v1", "--model", "big", "--api-key-env", "K"])
    settings = make_context(args).settings
    assert (settings.backend.url, settings.backend.model, settings.backend.api_key_env) == ("http://h:8000/v1", "big", "K")
    assert settings.model.model == Settings().model.model  # --model named the server's model, not a local one

    config = tmp_path / "config.toml"
    config.write_text('[backend]\nurl = "http://h:9000/v1"\nread_timeout_s = 0\n', encoding="utf-8")
    context = make_context(build_parser().parse_args(["launch", "--config", str(config)]))
    assert context.settings.backend.url == "http://h:9000/v1"
    assert context.settings.backend.read_timeout_s == BackendOptions().read_timeout_s
    assert any("read_timeout_s: must be above 0" in message for message in context.config_messages)


def test_the_api_key_is_sent_but_never_written_to_any_file_or_output(tmp_path):
    key = "sk-secret-never-stored-4711"
    home = tmp_path / "home"
    script = '{"op":"open","tab":"a"}\n{"op":"send","tab":"a","text":"hi"}\n{"op":"wait"}\n{"op":"stats"}\n'
    with FakeServer() as server:
        completed = subprocess.run(
            [str(CHATKV), "launch", "--headless", "--script", "-", "--data-dir", str(home), "--backend", server.url,
             "--api-key-env", "CHATKV_TEST_KEY"],
            input=script.encode(), capture_output=True, timeout=120, env={**_env(), "CHATKV_TEST_KEY": key},
        )
    assert completed.returncode == 0, completed.stderr.decode()
    assert server.requests[-1]["authorization"] == f"Bearer {key}"
    turns = [json.loads(line) for line in completed.stdout.decode().splitlines() if '"turn"' in line]
    assert turns and turns[0]["reused_tokens"] is None  # this server reports no cache figure: null, not 0
    assert key.encode() not in completed.stdout + completed.stderr
    written = [path for path in home.rglob("*") if path.is_file()]
    assert written  # the conversation was saved...
    assert not [path for path in written if key.encode() in path.read_bytes()]  # ...without the key


def _env() -> dict[str, str]:
    import os

    return {name: value for name, value in os.environ.items() if name != "OPENAI_API_KEY"}


async def test_the_palette_lists_the_servers_models_and_switches_the_current_tab_for_good(data_dir):
    paths = Paths.resolve(data_dir)
    with FakeServer() as server, RemoteBackend(BackendOptions(url=server.url, metrics=False)).start() as backend:
        assert backend.probe() == [] and backend.default_model == MODEL
        app = make_app(Settings(), backend, ConversationStore(paths), paths.user_themes, AppOptions())
        async with app.run_test(size=(130, 40)) as pilot:
            first = app.chat_tabs.current
            second = await app.open_new_conversation("second")
            app.chat_tabs.activate(first)
            await pilot.press("ctrl+p")
            await pilot.press(*f"Model: {OTHER_MODEL}")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause(0.1)
            for tab in (first, second):
                tab.send("hello")
                await tab.wait_for_turn()
        assert [request["body"]["model"] for request in server.requests] == [OTHER_MODEL, MODEL]
        first_id = first.session_id

    # the choice is remembered with the conversation: after a relaunch (a new backend) the tab still asks for it
    with FakeServer() as server, RemoteBackend(BackendOptions(url=server.url, metrics=False)).start() as backend:
        backend.probe()
        again = make_app(Settings(), backend, ConversationStore(paths), paths.user_themes, AppOptions())
        async with again.run_test(size=(130, 40)):
            for tab in again.chat_tabs.chat_tabs:
                tab.send("again")
                await tab.wait_for_turn()
            models = {tab.session_id: tab.conversation.model for tab in again.chat_tabs.chat_tabs}
        assert models[first_id] == OTHER_MODEL
        assert sorted(request["body"]["model"] for request in server.requests) == sorted([OTHER_MODEL, MODEL])


def test_bench_with_a_backend_refuses_local_only_scenarios_and_an_unreachable_server(capsys, data_dir):
    from chatkv.cli import main

    assert main(["bench", "--backend", "http://127.0.0.1:1/v1", "seed"]) == 2
    assert "with --backend the scenarios are multiturn, batching" in capsys.readouterr().err
    assert main(["bench", "--backend", "http://127.0.0.1:1/v1", "multiturn"]) == 1
    assert "Cannot reach the server at http://127.0.0.1:1/v1" in capsys.readouterr().err
