"""The one error hierarchy of xmodal.

Every layer raises subclasses of :class:`XmodalError`; only the service maps them to HTTP status codes
(``service/errors.py``), and the CLI prints their message. ``code`` is the stable machine-readable name.
"""

from __future__ import annotations

from typing import Any


class XmodalError(Exception):
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(XmodalError):
    """The caller sent something we cannot use (bad query, bad corpus line, bad option)."""

    code = "invalid_input"


class NotFound(XmodalError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class IndexNotFound(NotFound):
    code = "index_not_found"


class BundleError(XmodalError):
    """A model or index bundle on disk is incomplete, corrupt or inconsistent."""

    code = "bad_bundle"


class FingerprintMismatch(BundleError):
    code = "fingerprint_mismatch"


class AdapterMismatch(FingerprintMismatch):
    """An adapter bundle does not map between the two models asked for (its from/to fingerprints differ)."""

    code = "adapter_mismatch"


class MissingDependency(XmodalError):
    """An optional dependency (ONNX Runtime, FAISS, torch) is not installed; the message names the fix."""

    code = "missing_dependency"


class ExportError(XmodalError):
    code = "export_failed"


class ParityError(ExportError):
    """The exported graph does not reproduce the torch model; no bundle is written."""

    code = "parity_failed"
