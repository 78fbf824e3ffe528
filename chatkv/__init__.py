"""chatkv: a terminal chat for local language models with per-session KV reuse and batching."""

__version__ = "0.1.0"
