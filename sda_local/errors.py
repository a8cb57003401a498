"""Exceptions whose message is what the user sees: one line, no traceback (the CLI prints ``error: <msg>``)."""


class SDAError(Exception):
    """Base class of every error sda-local reports to the user."""


class ModelError(SDAError):
    """A model file is missing, truncated, not GGUF, fails its checksum or cannot be fetched."""


class InputError(SDAError):
    """A query, option or input file that cannot be used as given."""


class ContextOverflowError(InputError):
    """The prompt does not fit in the context window."""
