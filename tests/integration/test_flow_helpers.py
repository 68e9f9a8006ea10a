"""flows.training's presentation helpers: no Prefect server needed."""

from __future__ import annotations


def test_render_markdown_tables_lists_and_scalars() -> None:
    from flows.artifacts import render_markdown

    text = render_markdown("Stage `gate`", {
        "passed": False, "auc": 0.912345, "reasons": ["auc 0.91 >= 0.85: pass", "a|b"],
        "expectations": [{"type": "t1", "success": True}, {"type": "t2", "success": False}],
    })
    assert text.splitlines()[0] == "# Stage `gate`"
    assert "| passed | False |" in text and "| auc | 0.9123 |" in text
    assert "- auc 0.91 >= 0.85: pass" in text and "- a\\|b" in text
    assert "| type | success |" in text and "| t2 | False |" in text


def test_summarize_repro_keeps_dvc_lines_only() -> None:
    from flows.artifacts import summarize_repro

    ran = ("Running stage 'gate':\n> medops stage gate\n{\n  \"passed\": true\n}\n"
           "Updating lock file 'dvc.lock'\n\nTo track the changes with git, run:\n\n\tgit add dvc.lock\n")
    assert summarize_repro(ran) == "Running stage 'gate':; Updating lock file 'dvc.lock'"
    skipped = "Stage 'gate' didn't change, skipping\nData and pipelines are up to date.\n"
    assert summarize_repro(skipped) == ("Stage 'gate' didn't change, skipping; "
                                        "Data and pipelines are up to date.")
