"""The ingest stage: a hospital DICOM export -> de-identified DICOM + model-ready arrays + metadata.

Inputs, outputs and params: see :mod:`medops.stages.ingest.stage`, which holds the stage.
"""

from medops.stages.ingest.stage import (
    FOLDER_LABELS,
    FOLDER_SPLITS,
    INDEX_NAME,
    OUTPUT_VERSION,
    QUARANTINE_COLUMNS,
    FileOutcome,
    IngestResult,
    chunk_size,
    format_summary,
    iter_source_files,
    labels_from_path,
    metadata_frame,
    process_chunk,
    process_file,
    read_manifest,
    run,
)

__all__ = [
    "FOLDER_LABELS", "FOLDER_SPLITS", "INDEX_NAME", "OUTPUT_VERSION", "QUARANTINE_COLUMNS",
    "FileOutcome", "IngestResult", "chunk_size", "format_summary", "iter_source_files",
    "labels_from_path", "metadata_frame", "process_chunk", "process_file", "read_manifest", "run",
]
