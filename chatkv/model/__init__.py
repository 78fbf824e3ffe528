"""Finding, fetching, converting and loading the model; its fingerprint.

The loader (and with it torch) is imported on first use (PEP 562), so checking a flag or a file stays fast.
"""

from chatkv.model.errors import ModelError
from chatkv.model.source import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "ModelBundle", "ModelError", "load_model"]


def __getattr__(name: str):
    if name in ("ModelBundle", "load_model"):
        from chatkv.model import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
