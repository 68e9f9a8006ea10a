"""Ingest: a hospital DICOM export -> de-identified DICOM + model-ready arrays + metadata.

Inputs:  ``source_dir``: every file below it, any name, any depth (nothing is skipped silently:
         each file, and each entry that cannot be read as one, is either used or listed in
         quarantine.csv with a reason);
         ``manifest`` (optional): CSV or Parquet with ``label`` (0/1, may be empty), optionally
         ``split``, and ``sop_instance_uid`` (the ORIGINAL SOP Instance UID) and/or ``path``
         (relative to source_dir) to match files. With a manifest, a file it does not list is
         quarantined as ``no_label``; without one, labels and splits come from folder names
         (``NORMAL`` / ``PNEUMONIA``, ``train`` / ``val`` / ``test``) where there are any.
Outputs: below ``out_dir``, exactly as :mod:`medops.data` documents: ``dicom/shard-NNNNN.zip``
         (the de-identified files, PS3.15 Annex E, packed per shard: a bounded number of files
         whatever the export's size), ``arrays/shard-NNNNN.npy`` (float32 (n, S, S) in [0, 1]),
         ``metadata.parquet`` (METADATA_COLUMNS, one row per used image, pseudonymous UIDs only)
         and ``quarantine.csv`` (``path`` relative to source_dir, ``reason``, ``detail``; written
         even when empty); ``ingest_index.json`` (settings fingerprint and each source file's
         SHA-256, for incremental runs).
Params:  ``ingest`` (image_size, window, workers, cluster, shard_size, file_timeout_s, deid).

Files are read, de-identified and decoded in ``workers`` processes (a local pool, or a Dask
cluster with ``cluster``), a chunk of files per task so that inter-process traffic does not
dominate; workers write no output (a local pool's workers leave the de-identified files in spill
files below ``.staging`` for the parent to copy, see :class:`~medops.stages.ingest.pool.LocalPool`),
the parent writes every output and places rows in shards in source-path order, so the output does not depend on the number of workers nor on where they ran. Memory stays bounded on exports of
any size: the folder is listed as it is walked, a bounded number of chunks is in flight, and every
output (shards, metadata row groups, quarantine rows, index entries) is written as it is produced;
what duplicate detection remembers of each used file is in an on-disk table below ``.staging``
(see the note above :func:`iter_source_files`). A re-run over a grown export decodes only the new content (see
:func:`run`), writing only the shards that changed; the same inputs always give byte-identical
outputs.

Modules (each imported by the worker processes too, so nothing heavy at module level):
``stage`` (:func:`run`, the entry point, and :class:`IngestResult`), ``manifest`` (labels from a
manifest or folder names), ``source`` (listing the source folder), ``worker`` (the per-file work),
``executors`` (the interface to where the work runs, and the in-order window), ``pool`` (the local
process pool and its scheduling), ``cluster`` (a Dask cluster; imported only when configured),
``writers`` (shards and their packs, metadata.parquet, quarantine.csv), ``index`` (the
incremental index and what an earlier run left), ``publish``
(the PHI-free dataset DVC versions, made from a private ingest output).

quarantine.csv and ingest_index.json name the export's files by their paths, which hospitals often
build from names and record numbers: a project keeps this stage's output private (below
``.medops/``) and versions what :func:`medops.stages.ingest.publish.publish_dataset` makes of it
(:func:`medops.pipeline.ingest_export` does both).
"""

# medops.data (and so pandas) is imported inside the functions that need it: the worker
# processes import this package, and pandas would double their start-up time for nothing
from medops.stages.ingest.index import INDEX_NAME, OUTPUT_VERSION
from medops.stages.ingest.manifest import (FOLDER_LABELS, FOLDER_SPLITS, find_manifests, labels_from_path,
                                           read_manifest, read_manifests)
from medops.stages.ingest.pool import chunk_size
from medops.stages.ingest.source import iter_source_files
from medops.stages.ingest.stage import IngestResult, format_summary, run
from medops.stages.ingest.worker import (FileOutcome, WorkerSpec, process_chunk, process_file,
                                         process_guarded)
from medops.stages.ingest.writers import QUARANTINE_COLUMNS, metadata_frame

__all__ = [
    "FOLDER_LABELS", "FOLDER_SPLITS", "INDEX_NAME", "OUTPUT_VERSION", "QUARANTINE_COLUMNS",
    "FileOutcome", "IngestResult", "WorkerSpec", "chunk_size", "format_summary", "iter_source_files",
    "find_manifests", "labels_from_path", "metadata_frame", "process_chunk", "process_file",
    "process_guarded",
    "read_manifest", "read_manifests", "run",
]
