"""What every ``chatkv`` subcommand is handed: the parsed arguments, the settings and the folders."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from chatkv.config import Settings
from chatkv.paths import Paths


@dataclass
class Context:
    """What every subcommand gets: the parsed arguments, the settings after the config file and flags, and the folders."""

    args: argparse.Namespace
    settings: Settings
    paths: Paths
    config_messages: list[str]
