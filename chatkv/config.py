"""Typed settings, read once from the config file and the command line, then passed down.

Defaults for the KV store and batching come from the seed design (SmallMind's KvCacheOptions and
BatchingOptions). The config file is TOML with the same names as the dataclass fields:

    [kv]
    max_bytes_total = "512MiB"
    [batching]
    max_batch_size = 16
    [speculative]
    draft_tokens = 3
    [model]
    dtype = "float32"

Unknown keys and wrong types are reported as ``ConfigError`` messages and the default is kept.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatkv.safe_read import UnreadableFile, read_capped

GIB = 1024**3
MAX_CONFIG_BYTES = 1024**2  # a config file is a few lines; refuse anything this large


@dataclass
class KvOptions:
    enabled: bool = True
    max_tokens_per_session: int = 4096
    max_sessions: int = 1000
    max_bytes_total: int = 1 * GIB
    persist_across_requests: bool = True
    # a prompt that starts with full KV blocks another session computed uses them instead of prefilling
    share_prefixes: bool = True


@dataclass
class BatchingOptions:
    enabled: bool = True
    max_batch_size: int = 8
    max_batch_wait_ms: int = 10
    max_total_queued_requests: int = 100
    prefill_only: bool = False
    # tokens of prompt prefilled per forward pass, so long prompts do not stall decoding tabs
    prefill_chunk_tokens: int = 512


@dataclass
class SpeculativeOptions:
    # greedy turns guess up to this many next tokens from their own conversation (prompt lookup) and check
    # them in one forward; the reply is the same as without guessing. 0: off
    draft_tokens: int = 3


@dataclass
class SnapshotOptions:
    enabled: bool = True
    max_disk_bytes: int = 2 * GIB


@dataclass
class ModelOptions:
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0  # 0: chatkv's thread policy (chatkv.engine.threads)
    quant: str = "auto"  # auto | none | int8 | int4 weights (auto: int4 in bf16 on CPU, none in fp32)
    engine_process: bool = True  # the engine in a child process, so drawing the UI never slows decoding


# Used where neither config.toml nor the model's generation config sets a value: SmolLM2's model card samples
# with temperature 0.2 and top-p 0.9, and a mild repetition penalty (llama.cpp's and Ollama's 1.1) keeps a
# small model from repeating one line until the token limit.
SAMPLING_FALLBACK = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    # None: the model's generation config where it sets the value, else SAMPLING_FALLBACK. temperature 0 is greedy.
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_time_ms: int = 0  # 0: no limit
    system_prompt: str = ""

    def fill_sampling_defaults(self, model_defaults: dict[str, float]) -> None:
        """Give every sampling value the config left unset the model's own (``ModelBundle.sampling_defaults``), else the fallback."""
        for name, fallback in SAMPLING_FALLBACK.items():
            if getattr(self, name) is None:
                setattr(self, name, float(model_defaults.get(name, fallback)))

    def sampling_value(self, name: str) -> float:
        """``temperature``, ``top_p`` or ``repetition_penalty`` as a turn uses it: the setting, or the fallback while unset."""
        value = getattr(self, name)
        return SAMPLING_FALLBACK[name] if value is None else value


@dataclass
class UiOptions:
    theme: str = "chatkv-dark"
    stats_panel: str = "auto"  # auto | show | hide


@dataclass
class BackendOptions:
    """A remote OpenAI-compatible server instead of the local engine (``--backend``); empty url: local."""

    url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the server's model name; empty: the first one /v1/models lists
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key; the key itself is never stored
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0  # longest silence between two streamed chunks before a turn fails
    metrics: bool = True  # scrape the server's Prometheus /metrics for the stats panel


@dataclass
class Settings:
    kv: KvOptions = field(default_factory=KvOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    snapshot: SnapshotOptions = field(default_factory=SnapshotOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    ui: UiOptions = field(default_factory=UiOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)


class ConfigError(Exception):
    """A problem in the user's config that they can fix; the message says where and what."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: str | int) -> int:
    """'1GiB', '512 MiB', '2GB' or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        # a TOML float such as 1.5 would otherwise be read as 1 byte
        raise ValueError(f"expected a size such as \"512MiB\" or a whole number of bytes, got {value!r}")
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"expected a size such as 512MiB or 2GiB, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower() if unit else None])


_SIZE_FIELDS = {"max_bytes_total", "max_disk_bytes"}
# the same choices the command-line flags offer
_CHOICES = {
    ("model", "dtype"): ("auto", "bfloat16", "float32"),
    ("model", "device"): ("auto", "cpu", "cuda"),
    ("model", "quant"): ("auto", "none", "int8", "int4"),
    ("ui", "stats_panel"): ("auto", "show", "hide"),
}
# settings whose default None means "decided later" (the model's generation config)
_OPTIONAL_FLOATS = {("generation", "temperature"): float, ("generation", "top_p"): float,
                    ("generation", "repetition_penalty"): float}
# counts where 0 would leave the engine unable to take a single turn
_AT_LEAST_ONE = {
    ("kv", "max_tokens_per_session"), ("kv", "max_sessions"),
    ("batching", "max_batch_size"), ("batching", "max_total_queued_requests"), ("batching", "prefill_chunk_tokens"),
    ("generation", "max_new_tokens"),
}
# seconds that must be above zero: a zero timeout would fail every request at once
_ABOVE_ZERO = {("backend", "connect_timeout_s"), ("backend", "read_timeout_s")}


def _coerce(section: str, name: str, value: Any, default: Any) -> Any:
    where = f"[{section}] {name}"
    if name in _SIZE_FIELDS:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    expected = _OPTIONAL_FLOATS.get((section, name), type(default)) if default is None else type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if expected in (int, float) and value < 0:
        raise ConfigError(f"{where}: must not be negative, got {value}")
    if (section, name) in _AT_LEAST_ONE and value < 1:
        raise ConfigError(f"{where}: must be at least 1, got {value}")
    if (section, name) in _ABOVE_ZERO and value <= 0:
        raise ConfigError(f"{where}: must be above 0, got {value}")
    if (section, name) == ("generation", "top_p") and not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}: must be above 0 and at most 1, got {value}")
    if (section, name) == ("generation", "repetition_penalty") and value <= 0:
        raise ConfigError(f"{where}: must be above 0 (1 is off), got {value}")
    choices = _CHOICES.get((section, name))
    if choices and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def apply_mapping(settings: Settings, data: dict[str, Any]) -> list[str]:
    """Apply a parsed TOML mapping to ``settings``; return one message per key that was ignored."""
    problems: list[str] = []
    # only the dataclass's own fields are sections: getattr alone would also find "__class__" and friends
    section_names = {f.name for f in dataclasses.fields(settings)}
    for section_name, section_values in data.items():
        if section_name not in section_names:
            problems.append(f"unknown section [{section_name}] ignored")
            continue
        section = getattr(settings, section_name)
        if not isinstance(section_values, dict):
            problems.append(f"[{section_name}] should be a table, got {type(section_values).__name__}; ignored")
            continue
        known = {f.name: f for f in dataclasses.fields(section)}
        for key, value in section_values.items():
            if key not in known:
                problems.append(f"unknown key [{section_name}] {key} ignored")
                continue
            try:
                setattr(section, key, _coerce(section_name, key, value, getattr(section, key)))
            except ConfigError as exc:
                problems.append(f"{exc}; keeping the default")
    return problems


def load_settings(path: str | os.PathLike | None) -> tuple[Settings, list[str]]:
    """Read the config file if there is one. Never raises for the file's content: problems come back as messages."""
    settings = Settings()
    if path is None:
        return settings, []
    path = Path(path)  # --config arrives as a plain string
    if not path.exists():
        return settings, []
    try:
        data = tomllib.loads(read_capped(path, MAX_CONFIG_BYTES, follow_symlinks=True).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return settings, [f"{path}: not valid TOML ({exc}); using defaults"]
    except UnreadableFile as exc:  # a folder, a FIFO, a huge file
        return settings, [f"{path}: cannot be read ({exc.reason}); using defaults"]
    except OSError as exc:
        return settings, [f"{path}: cannot be read ({exc.strerror}); using defaults"]
    return settings, [f"{path}: {message}" for message in apply_mapping(settings, data)]
