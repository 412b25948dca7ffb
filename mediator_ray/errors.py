"""Exception hierarchy.

Every error a user can cause (a bad URI, a corrupt file, an incompatible expert, a bad config)
is a subclass of :class:`MediatorError` and names the object, tensor or field at fault, so the
CLI can print it without a traceback and tests can assert on the exact kind of failure.
"""

from __future__ import annotations


class MediatorError(Exception):
    """Base class of every error mediator-ray raises on purpose."""


class StorageError(MediatorError):
    """Object storage failed: missing object or bucket, refused credentials, network trouble."""


class ObjectNotFoundError(StorageError):
    """The named object (file or S3 key) does not exist."""


class CheckpointFormatError(MediatorError):
    """A safetensors file or Hugging Face checkpoint folder is malformed."""


class IncompatibleCheckpointError(MediatorError):
    """An expert does not match the base model (names, shapes, dtypes or architecture)."""


class ConfigError(MediatorError):
    """A configuration file or option is invalid."""
