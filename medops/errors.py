"""Typed errors, and the exit codes of the ``medops`` command they map to.

Per-item failures are data (quarantine records); stage failures are these. Each error class names
its ``exit_code`` (a subclass inherits its parent's), so the CLI's table of exit codes is defined
here, once, and ``exit_code_for`` is the only mapping.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """What ``medops`` exits with. Small codes, as git, curl and grep use them: 2 is argparse's
    own for a usage error, so the codes of sysexits.h (64-78) would sit beside it as a second
    scheme; 130 is the shell's convention for Ctrl-C (128 + SIGINT)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    BAD_INPUT = 3
    REFUSED = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        """One line for ``medops --help`` and the README."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.FAILURE: "the command failed (a stage error, a model that failed its checks on "
                      "Triton, DVC failed) or an unexpected error (a bug: Python's traceback on "
                      "stderr); monitor: a drift test fired (as diff exits 1 on a difference)",
    ExitCode.USAGE: "usage error: unknown command or option, bad option value (argparse's own code)",
    ExitCode.BAD_INPUT: "bad input: invalid params.yaml, unknown stage, missing or unusable input "
                        "files or data (ingest's source or manifest, a failed data-quality suite); "
                        "predict: some files got no answer (the others did)",
    ExitCode.REFUSED: "refused by the gate: its decision (reports/gate.json) is missing, invalid or "
                      "failed, or the model is not the one it judged",
    ExitCode.UNAVAILABLE: "server unreachable: Triton cannot be reached (after the retries) or is "
                          "not live; serve status: it is not running or not ready",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class MedopsError(Exception):
    """Base class: a stage could not do its job; the message says which check failed on what."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE


class ConfigError(MedopsError):
    """params.yaml (or a flow parameter) is invalid."""

    exit_code = ExitCode.BAD_INPUT


class DicomReadError(MedopsError):
    """A file could not be read or decoded as DICOM; ``reason`` is a QuarantineReason."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, reason: "QuarantineReason") -> None:
        super().__init__(message)
        self.reason = reason


class DataQualityError(MedopsError):
    """A critical data-quality expectation failed."""

    exit_code = ExitCode.BAD_INPUT


class ExportParityError(MedopsError):
    """The exported ONNX model does not reproduce the Keras model's outputs."""


class SplitError(MedopsError):
    """The train/val/test split cannot be made or would leak a patient across splits."""

    exit_code = ExitCode.BAD_INPUT


class GateRejectedError(MedopsError):
    """Deployment was asked for a model the gate did not pass."""

    exit_code = ExitCode.REFUSED


class ServingError(MedopsError):
    """Triton could not be started, reached, or made to load a model."""


class ServerUnreachableError(ServingError):
    """Triton does not answer at the given address (connection refused, gRPC UNAVAILABLE, after
    the retries), or answers that it is not live. Other ServingErrors are answers."""

    exit_code = ExitCode.UNAVAILABLE


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
    TOO_LARGE = "too_large"  # over a byte or pixel limit (serving's, or a file's inflated or
    #                          decoded size); refused before the memory is taken
    TIMEOUT = "timeout"  # took longer than ingest.file_timeout_s: its worker process was killed


class IngestError(MedopsError):
    """The ingest stage as a whole cannot run (no source folder, an unusable manifest)."""

    exit_code = ExitCode.BAD_INPUT


class MonitorDataError(MedopsError):
    """Drift monitoring has nothing to compare: no reference yet, or too few recorded answers."""

    exit_code = ExitCode.BAD_INPUT


class DvcError(MedopsError):
    """A dvc command failed, or a path is not tracked by DVC; the message ends with dvc's stderr."""


class PrefectServerError(MedopsError):
    """The local Prefect server could not be started, reached or stopped."""


class DistributionError(MedopsError):
    """A distribution plan cannot be carried out here (devices already initialised, a cluster
    that does not match TF_CONFIG, a replica count that differs from the plan)."""


# What a per-item handler lets through when it catches BaseException: the process is being asked
# to stop. Anything else an item raises is that item's failure, including what a decoder written
# in Rust or C raises that is no Exception (pyo3's PanicException derives from BaseException).
PROCESS_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (tritonclient's and onnxruntime's run to many), else
    its type's name: what an error message quotes of an underlying exception."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for ``exc``: a MedopsError's own ``exit_code``, INTERRUPTED for Ctrl-C,
    FAILURE for anything else."""
    if isinstance(exc, MedopsError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILURE
