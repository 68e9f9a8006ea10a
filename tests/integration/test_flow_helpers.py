"""flows.artifacts: what the flows post to the Prefect UI, built without a Prefect server."""

from __future__ import annotations

from pathlib import Path


def test_result_fields_become_rows_nested_objects_flattened() -> None:
    from flows.artifacts import field_rows

    rows = field_rows({"passed": False, "auc": 0.912345, "images": {"train": 80, "val": 20},
                       "reasons": ["a: pass"], "history": {"loss": [0.5, 0.4]},
                       "expectations": [{"type": "t1"}]})
    assert rows == [{"field": "passed", "value": False}, {"field": "auc", "value": 0.9123},
                    {"field": "images.train", "value": 80}, {"field": "images.val", "value": 20}]


def test_lists_become_their_own_tables() -> None:
    from flows.artifacts import list_tables

    tables = {t.key: t for t in list_tables("gate", {
        "reasons": ["auc 0.910 >= min_auc 0.850: pass", "accuracy 0.700 < min_accuracy 0.750: fail"],
        "history": {"loss": [0.5, 0.4], "val_auc": [0.7, 0.8]},
        "expectations": [{"type": "t1", "success": True}, {"type": "t2", "success": False}],
        "warnings": ["odd sex codes"],
    })}
    assert set(tables) == {"gate-reasons", "gate-history", "gate-expectations", "gate-warnings"}
    assert all(t.kind == "table" for t in tables.values())
    assert tables["gate-reasons"].data == [
        {"check": "auc 0.910 >= min_auc 0.850", "result": "pass"},
        {"check": "accuracy 0.700 < min_accuracy 0.750", "result": "fail"}]
    assert tables["gate-history"].data == [{"epoch": 1, "loss": 0.5, "val_auc": 0.7},
                                           {"epoch": 2, "loss": 0.4, "val_auc": 0.8}]
    assert tables["gate-expectations"].data[1] == {"type": "t2", "success": False}
    assert tables["gate-warnings"].data == [{"warnings": "odd sex codes"}]


def test_images_are_data_urls_and_reports_are_links(tmp_path: Path) -> None:
    import base64

    from PIL import Image

    from flows.artifacts import artifact_key, stage_artifacts

    plots = tmp_path / "plots"
    plots.mkdir()
    Image.new("L", (4, 4), 128).save(plots / "reliability.png")
    (plots / "roc.csv").write_text("fpr,tpr\n")
    posted = stage_artifacts("evaluate", {"auc": 0.9, "plots_dir": str(plots)})
    assert [(a.kind, a.key) for a in posted] == [("table", "stage-evaluate"), ("image", "evaluate-reliability")]
    url = posted[1].data
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (plots / "reliability.png").read_bytes()
    assert str(plots / "reliability.png") in posted[1].description

    docs = tmp_path / "data_docs" / "index.html"
    (link,) = [a for a in stage_artifacts("quality", {"success": True, "data_docs": str(docs)}) if a.kind == "link"]
    assert link.key == "quality-report" and link.data == docs.as_uri() and "Data Docs" in link.link_text
    # a result without the paths it names posts its tables only
    assert [a.kind for a in stage_artifacts("train", {"epochs_run": 1})] == ["table"]
    assert artifact_key("explain", "gradcam_00 Sample") == "explain-gradcam-00-sample"


def test_summarize_repro_keeps_dvc_lines_only() -> None:
    from flows.artifacts import summarize_repro

    ran = ("Running stage 'gate':\n> medops stage gate\n{\n  \"passed\": true\n}\n"
           "Updating lock file 'dvc.lock'\n\nTo track the changes with git, run:\n\n\tgit add dvc.lock\n")
    assert summarize_repro(ran) == "Running stage 'gate':; Updating lock file 'dvc.lock'"
    skipped = "Stage 'gate' didn't change, skipping\nData and pipelines are up to date.\n"
    assert summarize_repro(skipped) == ("Stage 'gate' didn't change, skipping; "
                                        "Data and pipelines are up to date.")
