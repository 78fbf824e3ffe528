"""Theme files: the shipped ones load, apply and read well; broken ones are reported in one line and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.color import Color
from textual.widgets import Label

from chatkv.config import UiOptions
from chatkv.tui.themes import builtin_themes_dir, load_themes

SHIPPED = ["chatkv-dark", "chatkv-ember", "chatkv-light", "chatkv-mint"]

GOOD_THEME = """\
name = "{name}"
dark = true
primary = "#4fb3bf"
secondary = "#7c8cff"
accent = "#f2a65a"
background = "#14161b"
surface = "#1b1e25"
panel = "#232731"
foreground = "#e2e4e9"
warning = "#e8b04f"
error = "#e06c75"
success = "#7ec27a"
"""


def write_theme(folder: Path, file_name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(text, encoding="utf-8")
    return path


def shipped_themes():
    themes, problems = load_themes(builtin_themes_dir(), None)
    assert problems == []
    return themes


# the shipped themes ----------------------------------------------------------------------------------------


def test_builtin_folder_is_the_repository_themes_folder() -> None:
    folder = builtin_themes_dir()
    assert folder == Path(__file__).resolve().parent.parent / "themes"
    assert (folder / "chatkv-dark.toml").is_file()


def test_shipped_themes_load_without_problems() -> None:
    themes = shipped_themes()
    assert sorted(theme.name for theme in themes) == SHIPPED
    assert UiOptions().theme in SHIPPED
    assert sum(theme.dark for theme in themes) == 2, "two dark and two light themes ship"


def contrast_ratio(first: str, second: str) -> float:
    """WCAG 2 contrast ratio between two opaque colours."""

    def luminance(colour: str) -> float:
        channels = []
        for channel in Color.parse(colour).rgb:
            value = channel / 255
            channels.append(value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4)
        red, green, blue = channels
        return 0.2126 * red + 0.7152 * green + 0.0722 * blue

    lighter, darker = sorted((luminance(first), luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_theme_text_is_readable(name: str) -> None:
    theme = next(theme for theme in shipped_themes() if theme.name == name)
    for ground in (theme.background, theme.surface, theme.panel):
        assert contrast_ratio(theme.foreground, ground) >= 7, f"{name}: body text on {ground}"
    for colour in (theme.primary, theme.accent, theme.error, theme.warning, theme.success):
        assert contrast_ratio(colour, theme.panel) >= 3, f"{name}: {colour} on the panel {theme.panel}"
    assert (Color.parse(theme.background).brightness < 0.5) == theme.dark


class ThemedApp(App):
    def compose(self) -> ComposeResult:
        yield Label("sample")


async def test_every_shipped_theme_applies_in_an_app() -> None:
    app = ThemedApp()
    async with app.run_test(size=(40, 5)) as pilot:
        for theme in shipped_themes():
            app.register_theme(theme)
            app.theme = theme.name
            await pilot.pause()
            assert app.current_theme.name == theme.name
            assert app.screen.styles.background == Color.parse(theme.background)


# broken files ----------------------------------------------------------------------------------------------

BROKEN = {
    "not TOML": ('name = "x"\nprimary = \n', "not valid TOML"),
    "missing keys": ('name = "x"\ndark = true\nprimary = "#000000"\n', "missing secondary, accent"),
    "bad colour": (GOOD_THEME.format(name="x").replace('"#4fb3bf"', '"tealish"'), "primary is not a colour"),
    "colour as a number": (GOOD_THEME.format(name="x").replace('"#4fb3bf"', "123"), "primary must be a colour"),
    "dark as a string": (GOOD_THEME.format(name="x").replace("dark = true", 'dark = "yes"'), "dark must be true or false"),
    "empty name": (GOOD_THEME.format(name=" "), "name must be a non-empty string"),
    "unknown key": (GOOD_THEME.format(name="x") + 'primray = "#000000"\n', "unknown key primray"),
    "variables not a table": (GOOD_THEME.format(name="x") + 'variables = "none"\n', "variables must be a table"),
    "variable not a string": (GOOD_THEME.format(name="x") + "[variables]\nfooter-key-foreground = 3\n",
                              "variables.footer-key-foreground must be a string"),
    "not UTF-8": ("\udcff", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_user_theme_is_reported_in_one_line_and_skipped(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    user_dir = tmp_path / "themes"
    broken = user_dir / "broken.toml"
    user_dir.mkdir()
    broken.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    write_theme(user_dir, "fine.toml", GOOD_THEME.format(name="user-fine"))

    themes, problems = load_themes(builtin_themes_dir(), user_dir)

    assert len(problems) == 1
    assert problems[0].startswith(f"{broken}: ") and expected in problems[0] and problems[0].endswith("skipped")
    assert "\n" not in problems[0]
    assert [theme.name for theme in themes] == [*SHIPPED, "user-fine"]


def test_user_theme_overrides_a_shipped_one_by_name(tmp_path: Path) -> None:
    user_dir = tmp_path / "themes"
    write_theme(user_dir, "mine.toml", GOOD_THEME.format(name="chatkv-light").replace('"#4fb3bf"', '"#ff0000"'))

    themes, problems = load_themes(builtin_themes_dir(), user_dir)

    assert problems == []
    assert [theme.name for theme in themes] == SHIPPED  # replaced in place, not added twice
    light = next(theme for theme in themes if theme.name == "chatkv-light")
    assert light.primary == "#ff0000"


def test_user_theme_with_variables_is_loaded(tmp_path: Path) -> None:
    user_dir = tmp_path / "themes"
    write_theme(user_dir, "mine.toml", GOOD_THEME.format(name="mine") + '[variables]\nfooter-key-foreground = "#ff0000"\n')
    themes, problems = load_themes(builtin_themes_dir(), user_dir)
    assert problems == []
    assert themes[-1].name == "mine" and themes[-1].variables == {"footer-key-foreground": "#ff0000"}


def test_same_name_twice_in_one_folder_keeps_the_first(tmp_path: Path) -> None:
    user_dir = tmp_path / "themes"
    write_theme(user_dir, "a.toml", GOOD_THEME.format(name="twin"))
    second = write_theme(user_dir, "b.toml", GOOD_THEME.format(name="twin").replace('"#4fb3bf"', '"#ff0000"'))

    themes, problems = load_themes(tmp_path / "no-builtins-here", user_dir)

    assert [theme.name for theme in themes] == ["twin"] and themes[0].primary == "#4fb3bf"
    assert len(problems) == 2
    assert "shipped themes folder is missing" in problems[0]
    assert problems[1].startswith(f"{second}: theme 'twin' is already defined by a.toml")


def test_missing_user_folder_is_not_a_problem(tmp_path: Path) -> None:
    themes, problems = load_themes(builtin_themes_dir(), tmp_path / "absent")
    assert problems == [] and len(themes) == len(SHIPPED)


def test_files_other_than_toml_are_ignored(tmp_path: Path) -> None:
    user_dir = tmp_path / "themes"
    write_theme(user_dir, "notes.txt", "not a theme")
    write_theme(user_dir, "mine.toml.bak", "not a theme either")
    themes, problems = load_themes(builtin_themes_dir(), user_dir)
    assert problems == [] and len(themes) == len(SHIPPED)
