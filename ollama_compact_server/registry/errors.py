"""Typed registry errors; the API layer maps each to a status code."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class; the message is safe to show to a client (no server paths)."""

    status = 400


class InvalidName(RegistryError):
    status = 400


class InvalidDigest(RegistryError):
    status = 400


class DigestMismatch(RegistryError):
    status = 400


class ModelNotFound(RegistryError):
    status = 404


class BlobNotFound(RegistryError):
    status = 404


class InvalidModel(RegistryError):
    """Files that cannot become a model: unsafe formats, bad configs, malformed weights."""

    status = 400


class NameConflict(RegistryError):
    status = 409


class InUse(RegistryError):
    """A model others depend on (the base of adapter models)."""

    status = 409


class StorageError(RegistryError):
    """The disk failed (full, I/O error); the registry is unchanged."""

    status = 507
