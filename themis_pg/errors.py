"""Errors that carry the SQLSTATE a caller in PostgreSQL will see.

A worker that raises a ``ThemisError`` while serving a job fails that job once, with this
message and SQLSTATE, instead of retrying it: the input itself cannot succeed.  Any other
exception is reported as ``XX000`` (internal error).
"""

from __future__ import annotations


class ThemisError(Exception):
    """Base class: ``sqlstate`` is what the SQL function raises for it."""

    sqlstate = "XX000"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(ThemisError):
    """An argument is out of range or malformed."""

    sqlstate = "22023"  # invalid_parameter_value


class ContextOverflow(ThemisError):
    """The prompt cannot fit the model's context window."""

    sqlstate = "54000"  # program_limit_exceeded


class ModelMismatch(ThemisError):
    """Query and documents would be embedded with different models."""

    sqlstate = "55000"  # object_not_in_prerequisite_state


class ModelNotFound(ThemisError):
    """A model is not registered, or its file is missing or corrupt."""

    sqlstate = "58P01"  # undefined_file


class IngestError(ThemisError):
    """A file could not be read or parsed at ingest."""

    sqlstate = "22021"  # character_not_in_repertoire (bad encoding is the usual cause)


class InvalidAdapter(ThemisError):
    """A LoRA adapter file that is not a GGUF LoRA adapter for the base model it names."""

    sqlstate = "22023"  # invalid_parameter_value


class AdapterNotFound(ThemisError):
    """An adapter name the caller may not see, or that does not exist."""

    sqlstate = "42704"  # undefined_object
