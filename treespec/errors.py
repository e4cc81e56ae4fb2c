"""Errors that cross layers: the CLI prints one line and exits 2; the server maps each to an HTTP status."""


class TreespecError(Exception):
    """Base class for user-facing errors (bad model file, bad config, bad request)."""


class ModelLoadError(TreespecError):
    """A model path, file or checkpoint is missing, corrupt, unsafe or unsupported."""


class ConfigError(TreespecError, ValueError):
    """An engine, speculative or sampling setting is invalid; the message names the field."""


class QueueFullError(TreespecError):
    """The engine's waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class EngineClosedError(TreespecError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class MissingExtraError(TreespecError):
    """A command needs an optional dependency group (a pip extra) that is not installed."""


class DistributedError(TreespecError):
    """A tensor/pipeline-parallel group failed: a rank could not start, timed out or died (its requests fail)."""
