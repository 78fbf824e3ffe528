"""The model's one user-facing error, in a module without torch so callers can catch it before loading anything."""


class ModelError(Exception):
    """The model cannot be loaded as asked; the message says what to do."""
