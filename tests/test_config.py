"""Settings from config.toml: every problem becomes a message naming the key, and the default is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatkv.cli import main, make_context, build_parser
from chatkv.config import GIB, Settings, load_settings, parse_size


def load(tmp_path: Path, text: str | bytes) -> tuple[Settings, list[str]]:
    path = tmp_path / "config.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_settings(path)


def test_missing_config_file_gives_defaults_without_messages(tmp_path: Path):
    assert load_settings(tmp_path / "absent.toml") == (Settings(), [])
    assert load_settings(None) == (Settings(), [])


def test_valid_config_sets_every_kind_of_field(tmp_path: Path):
    settings, messages = load(tmp_path, """
        [kv]
        max_bytes_total = "512MiB"
        enabled = false
        [batching]
        max_batch_size = 16
        [model]
        dtype = "float32"
        [generation]
        temperature = 1
        top_p = 0.9
        system_prompt = "Be brief."
        [ui]
        theme = "chatkv-light"
    """)

    assert messages == []
    assert settings.kv.max_bytes_total == 512 * 1024**2
    assert settings.kv.enabled is False
    assert settings.batching.max_batch_size == 16
    assert settings.model.dtype == "float32"
    assert settings.generation.temperature == 1.0 and isinstance(settings.generation.temperature, float)
    assert settings.generation.top_p == 0.9
    assert settings.generation.system_prompt == "Be brief."
    assert settings.ui.theme == "chatkv-light"


@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 * 1024**2),
    ("512 MiB", 512 * 1024**2),
    ("2GB", 2 * 1000**3),
    ("1.5GiB", int(1.5 * GIB)),
    ("4096", 4096),
    (4096, 4096),
    ("1kib", 1024),
])
def test_sizes_are_read_in_the_usual_units(text, expected: int):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-5MiB", "5 parsecs", -1, True, 1.5, None, ""])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_unknown_section_and_key_are_reported_and_ignored(tmp_path: Path):
    settings, messages = load(tmp_path, """
        [kv]
        max_sesions = 5
        [telemetry]
        enabled = true
    """)

    assert settings == Settings()
    assert any("unknown key [kv] max_sesions ignored" in message for message in messages)
    assert any("unknown section [telemetry] ignored" in message for message in messages)
    assert all(message.startswith(str(tmp_path / "config.toml")) for message in messages)


def test_python_attribute_names_are_not_sections(tmp_path: Path):
    # getattr(settings, "__class__") exists; it must be treated as an unknown section, not walked into
    settings, messages = load(tmp_path, '["__class__"]\nkv = 1\n')

    assert settings == Settings()
    assert messages == [f"{tmp_path / 'config.toml'}: unknown section [__class__] ignored"]


@pytest.mark.parametrize(("text", "says"), [
    ("[kv]\nmax_sessions = \"many\"", "[kv] max_sessions: expected int, got str"),
    ("[kv]\nenabled = 1", "[kv] enabled: expected bool, got int"),
    ("[batching]\nmax_batch_size = true", "[batching] max_batch_size: expected int, got bool"),
    ("[batching]\nmax_batch_size = 8.0", "[batching] max_batch_size: expected int, got float"),
    ("[batching]\nmax_batch_size = 0", "[batching] max_batch_size: must be at least 1"),
    ("[kv]\nmax_sessions = -3", "[kv] max_sessions: must not be negative"),
    ("[generation]\ntemperature = -0.5", "[generation] temperature: must not be negative"),
    ("[generation]\ntemperature = nan", "[generation] temperature: must be a finite number"),
    ("[generation]\ntop_p = 1.5", "[generation] top_p: must be above 0 and at most 1"),
    ("[model]\ndtype = \"float16\"", "[model] dtype: must be one of auto, bfloat16, float32"),
    ("[model]\ndevice = \"tpu\"", "[model] device: must be one of auto, cpu, cuda"),
    ("[ui]\nstats_panel = \"sometimes\"", "[ui] stats_panel: must be one of auto, show, hide"),
    ("[kv]\nmax_bytes_total = \"heaps\"", "[kv] max_bytes_total: expected a size such as 512MiB"),
    ("[snapshot]\nmax_disk_bytes = 1.5", "[snapshot] max_disk_bytes: expected a size"),
    ("kv = 3", "[kv] should be a table, got int"),
    ("[kv.max_sessions]\nx = 1", "[kv] max_sessions: expected int, got dict"),
])
def test_wrong_value_is_reported_by_key_and_default_kept(tmp_path: Path, text: str, says: str):
    settings, messages = load(tmp_path, text)

    assert settings == Settings()
    assert len(messages) == 1
    assert says in messages[0]


def test_one_bad_key_does_not_discard_the_good_ones(tmp_path: Path):
    settings, messages = load(tmp_path, '[kv]\nmax_sessions = "x"\nmax_tokens_per_session = 2048\n')

    assert settings.kv.max_tokens_per_session == 2048
    assert settings.kv.max_sessions == Settings().kv.max_sessions
    assert len(messages) == 1


@pytest.mark.parametrize(("content", "says"), [
    ("[kv\nmax_sessions = 3", "not valid TOML"),
    ("[kv]\nmax_sessions = 3\nmax_sessions = 4\n", "not valid TOML"),
    (b"[ui]\ntheme = \"\xff\"\n", "not valid TOML"),
])
def test_unparsable_file_gives_all_defaults_and_one_message(tmp_path: Path, content, says: str):
    settings, messages = load(tmp_path, content)

    assert settings == Settings()
    assert len(messages) == 1 and says in messages[0] and "using defaults" in messages[0]


def test_config_path_that_is_a_folder_gives_defaults_and_a_message(tmp_path: Path):
    settings, messages = load_settings(tmp_path)

    assert settings == Settings()
    assert "cannot be read" in messages[0]


def test_command_line_flags_override_the_config_file(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[kv]\nmax_bytes_total = "512MiB"\n[batching]\nmax_batch_size = 4\n')
    args = build_parser().parse_args(
        ["launch", "--data-dir", str(tmp_path), "--config", str(config), "--max-kv-bytes", "1GiB"]
    )

    context = make_context(args)

    assert context.settings.kv.max_bytes_total == GIB
    assert context.settings.batching.max_batch_size == 4
    assert context.config_messages == []


def test_config_problems_are_printed_and_the_command_still_runs(tmp_path: Path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[kv]\nbogus = 1\n")

    assert main(["sessions", "list", "--data-dir", str(tmp_path / "home"), "--config", str(config)]) == 0

    captured = capsys.readouterr()
    assert "chatkv: config:" in captured.err and "unknown key [kv] bogus ignored" in captured.err
    assert "No saved conversations" in captured.out
