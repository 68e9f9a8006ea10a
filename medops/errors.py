"""Typed errors. Per-item failures are data (quarantine records); stage failures are these."""

from __future__ import annotations

from enum import Enum


class MedopsError(Exception):
    """Base class: a stage could not do its job; the message says which check failed on what."""


class ConfigError(MedopsError):
    """params.yaml (or a flow parameter) is invalid."""


class DicomReadError(MedopsError):
    """A file could not be read or decoded as DICOM; ``reason`` is a QuarantineReason."""

    def __init__(self, message: str, reason: "QuarantineReason") -> None:
        super().__init__(message)
        self.reason = reason


class DataQualityError(MedopsError):
    """A critical data-quality expectation failed."""


class ExportParityError(MedopsError):
    """The exported ONNX model does not reproduce the Keras model's outputs."""


class SplitError(MedopsError):
    """The train/val/test split cannot be made or would leak a patient across splits."""


class GateRejectedError(MedopsError):
    """Deployment was asked for a model the gate did not pass."""


class ServingError(MedopsError):
    """Triton could not be started, reached, or made to load a model."""


class QuarantineReason(str, Enum):
    """Why a file was not used. The values are what quarantine.csv's ``reason`` column holds."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNSUPPORTED_PIXELS = "unsupported_pixels"
    DECODE_ERROR = "decode_error"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    NO_LABEL = "no_label"
    DUPLICATE = "duplicate"
    DEID_FAILED = "deid_failed"  # de-identification itself failed (the file is never kept with PHI)
    TOO_LARGE = "too_large"  # over serving's byte or pixel limit; refused before decoding


class IngestError(MedopsError):
    """The ingest stage as a whole cannot run (no source folder, an unusable manifest)."""


class DvcError(MedopsError):
    """A dvc command failed, or a path is not tracked by DVC; the message ends with dvc's stderr."""


class PrefectServerError(MedopsError):
    """The local Prefect server could not be started, reached or stopped."""


class DistributionError(MedopsError):
    """A distribution plan cannot be carried out here (devices already initialised, a cluster
    that does not match TF_CONFIG, a replica count that differs from the plan)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (tritonclient's and onnxruntime's run to many), else
    its type's name: what an error message quotes of an underlying exception."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
