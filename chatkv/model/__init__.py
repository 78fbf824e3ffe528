"""Finding, fetching, converting and loading the model; its fingerprint."""

from chatkv.model.loader import ModelBundle, ModelError, load_model
from chatkv.model.source import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "ModelBundle", "ModelError", "load_model"]
