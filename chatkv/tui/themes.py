"""Themes as data files: read TOML files into Textual ``Theme`` objects, report the files that cannot be used.

chatkv ships its themes in ``themes/`` at the repository root; users add their own (or replace a shipped one
by using its name) as ``*.toml`` files in the config folder's ``themes/``. A file looks like:

    name = "chatkv-dark"
    dark = true
    primary = "#4fb3bf"
    secondary = "#7c8cff"
    accent = "#f2a65a"
    background = "#14161b"
    surface = "#1c1f26"
    panel = "#262a33"
    foreground = "#e2e4e9"
    warning = "#e8b04f"
    error = "#e06c75"
    success = "#7ec27a"

    [variables]            # optional: any of Textual's design variables
    footer-key-foreground = "#4fb3bf"

A file that is not valid TOML, lacks a key, has a key of the wrong type or a colour Textual cannot parse is
skipped and described in one line of the problems list, so the App can report them all in one notification
and carry on with the themes that did load.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

import chatkv
from chatkv.safe_read import UnreadableFile, read_capped

COLOUR_KEYS = ("primary", "secondary", "accent", "background", "surface", "panel", "foreground",
               "warning", "error", "success")
REQUIRED_KEYS = ("name", "dark", *COLOUR_KEYS)
OPTIONAL_KEYS = ("variables",)


class ThemeFileError(Exception):
    """What is wrong with one theme file, in words the user can act on."""


MAX_THEME_FILE_BYTES = 1024**2  # a theme is a few hundred bytes; anything near this is not a theme


def builtin_themes_dir() -> Path:
    """The shipped ``themes/`` folder.

    From a checkout (``pip install -e .``) it sits beside the ``chatkv`` package at the repository root;
    a regular install copies it to ``<prefix>/share/chatkv/themes`` (pyproject's data-files).
    """
    beside_package = Path(chatkv.__file__).resolve().parent.parent / "themes"
    if beside_package.is_dir():
        return beside_package
    return Path(sys.prefix) / "share" / "chatkv" / "themes"


def theme_from_mapping(data: dict[str, Any]) -> Theme:
    """Build a Theme from a parsed theme file; raise ThemeFileError naming the first thing that is wrong."""
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ThemeFileError(f"missing {', '.join(missing)}")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        # Strict on purpose: a misspelt optional key would otherwise be silently ignored.
        raise ThemeFileError(f"unknown key {', '.join(unknown)}")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise ThemeFileError("name must be a non-empty string")
    if not isinstance(data["dark"], bool):
        raise ThemeFileError(f"dark must be true or false, got {data['dark']!r}")
    for key in COLOUR_KEYS:
        check_colour(key, data[key])
    variables = data.get("variables", {})
    if not isinstance(variables, dict):
        raise ThemeFileError("variables must be a table")
    for key, value in variables.items():
        # Variables are not all colours (some are text styles such as "bold"), so only their type is checked.
        if not isinstance(value, str):
            raise ThemeFileError(f"variables.{key} must be a string, got {value!r}")
    return Theme(
        name=name.strip(),
        dark=data["dark"],
        variables=dict(variables),
        **{key: data[key] for key in COLOUR_KEYS},
    )


def check_colour(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ThemeFileError(f"{key} must be a colour string such as \"#1e90ff\", got {value!r}")
    try:
        Color.parse(value)
    except ColorParseError:
        raise ThemeFileError(f"{key} is not a colour: {value!r}") from None


def read_theme_file(path: Path) -> Theme:
    try:
        data = tomllib.loads(read_capped(path, MAX_THEME_FILE_BYTES, follow_symlinks=True).decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ThemeFileError(f"not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ThemeFileError("not UTF-8 text") from None
    except UnreadableFile as exc:
        raise ThemeFileError(exc.reason) from None
    except OSError as exc:
        raise ThemeFileError(f"cannot be read ({exc.strerror})") from None
    return theme_from_mapping(data)


def read_theme_folder(folder: Path, problems: list[str]) -> dict[str, Theme]:
    """Every usable theme in ``folder`` by name; a second file with a name already taken here is a problem."""
    themes: dict[str, Theme] = {}
    sources: dict[str, Path] = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            theme = read_theme_file(path)
        except ThemeFileError as exc:
            problems.append(one_line(f"{path}: {exc}; skipped"))
            continue
        if theme.name in themes:
            problems.append(f"{path}: theme {theme.name!r} is already defined by {sources[theme.name].name}; skipped")
            continue
        themes[theme.name] = theme
        sources[theme.name] = path
    return themes


def load_themes(builtin_dir: Path, user_dir: Path | None) -> tuple[list[Theme], list[str]]:
    """The shipped themes, then the user's; a user theme with a shipped theme's name replaces it in place.

    Returns the themes and one line per file that was skipped. A missing user folder (or None) is normal: most
    users have none. A missing built-in folder means a broken install and is reported.
    """
    problems: list[str] = []
    if builtin_dir.is_dir():
        themes = read_theme_folder(builtin_dir, problems)
    else:
        themes = {}
        problems.append(f"{builtin_dir}: the shipped themes folder is missing; only Textual's themes are available")
    if user_dir is not None and user_dir.is_dir():
        themes.update(read_theme_folder(user_dir, problems))
    return list(themes.values()), problems


def one_line(message: str) -> str:
    """TOML parse errors can span lines; the problems list promises one line per file."""
    return " ".join(message.split())
