"""Duplicate detection's on-disk memory (medops.stages.ingest.seen): the same answers as the
dicts it replaced, across transaction batches, and nothing left behind."""

import hashlib

import pytest

from medops.errors import IngestError
from medops.stages.ingest import seen as seen_module
from medops.stages.ingest.seen import SeenFiles


def _d(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def test_the_first_file_wins_by_content_then_by_sop_uid_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(seen_module, "_BATCH", 7)  # several commits within the run
    table = SeenFiles(tmp_path / "seen.sqlite")
    for i in range(50):
        assert table.first(_d(f"content {i}"), _d(f"uid {i}")) is None
        table.remember(_d(f"content {i}"), _d(f"uid {i}"), f"series/IM{i:03d}.dcm")
    # same bytes as file 3 (and the UID of file 40): the content match is named
    assert table.first(_d("content 3"), _d("uid 40")) == ("content", "series/IM003.dcm")
    assert table.first(_d("other bytes"), _d("uid 41")) == ("sop", "series/IM041.dcm")
    # a content digest never matches a UID digest of the same bytes
    assert table.first(_d("uid 5"), _d("content 5")) is None
    assert (tmp_path / "seen.sqlite").is_file()
    table.close()
    table.close()  # again: nothing
    assert not (tmp_path / "seen.sqlite").exists()


def test_a_table_that_cannot_be_created_is_an_ingest_error(tmp_path):
    with pytest.raises(IngestError, match="duplicate-detection table"):
        SeenFiles(tmp_path / "missing-folder" / "seen.sqlite")
