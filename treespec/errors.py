"""Errors that mean "the user gave us something we cannot use": the CLI prints one line and exits 2."""


class TreespecError(Exception):
    """Base class for user-facing errors (bad model file, bad config, bad request)."""


class ModelLoadError(TreespecError):
    """A model path, file or checkpoint is missing, corrupt, unsafe or unsupported."""


class ConfigError(TreespecError, ValueError):
    """An engine, speculative or sampling setting is invalid; the message names the field."""
