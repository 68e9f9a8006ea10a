"""What the flows post to the Prefect UI, as data: stage results as table artifacts, the images a
stage wrote as image artifacts, reports on disk as link artifacts, and DVC's own lines from
``dvc repro`` output. Building only: the flows post them (``post`` in flows/training.py), so all of
this is tested without a Prefect server.

Prefect's artifact types: ``table`` (a list of rows; the UI shows a sortable table), ``image`` (a
URL the UI puts in an ``<img>``), ``link`` (a markdown link), ``progress`` (a percentage, updated
while a task runs). An image is posted as a ``data:`` URL: the UI is a web page served by the
Prefect server, and a browser shows no ``file://`` image on an ``http://`` page, whereas a data URL
shows wherever the UI is opened. The file's own path goes with it, as the description.
"""

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

# the largest image posted inline (a data URL is stored in Prefect's database with the artifact)
MAX_IMAGE_BYTES = 2_000_000


@dataclass(frozen=True)
class Artifact:
    """One Prefect artifact to post. ``data``: rows (table), a URL (image, link)."""

    kind: Literal["table", "image", "link"]
    key: str
    data: Any
    description: str
    link_text: str | None = None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")


def _value(value: Any) -> Any:
    """A table cell: numbers and strings as they are (floats to 4 significant digits), anything
    else as short JSON."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _is_series(value: Any) -> bool:
    """A dict of equal-length lists of numbers, e.g. training history per epoch."""
    if not isinstance(value, dict) or not value:
        return False
    lists = list(value.values())
    return (all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) for v in lists)
            and len({len(v) for v in lists}) == 1)


def field_rows(result: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """The result's scalars as ``{"field", "value"}`` rows; nested objects flattened
    (``images.train``); lists of records, of strings and series are left to their own tables."""
    rows: list[dict[str, Any]] = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if _is_records(value) or _is_strings(value) or _is_series(value):
            continue
        if isinstance(value, dict) and value:
            rows += field_rows(value, prefix=f"{name}.")
        else:
            rows.append({"field": name, "value": _value(value)})
    return rows


def _check_row(reason: str) -> dict[str, Any]:
    """A gate reason ("auc 0.910 >= min_auc 0.850: pass") as a row: the check and its outcome."""
    check, sep, outcome = reason.rpartition(": ")
    if sep and outcome in ("pass", "fail"):
        return {"check": check, "result": outcome}
    return {"check": reason, "result": ""}


def list_tables(name: str, result: dict[str, Any]) -> list[Artifact]:
    """A table per list in the result: records as they are, series by index (one row per epoch),
    strings one per row (checks with a pass/fail outcome split in two columns)."""
    tables = []
    for key, value in result.items():
        if _is_records(value):
            rows = [{k: _value(v) for k, v in row.items()} for row in value]
        elif _is_series(value):
            n = len(next(iter(value.values())))
            rows = [{"epoch": i + 1, **{k: _value(v[i]) for k, v in value.items()}} for i in range(n)]
        elif _is_strings(value):
            rows = [_check_row(v) for v in value] if key == "reasons" else [{key: v} for v in value]
        else:
            continue
        tables.append(Artifact("table", artifact_key(name, key), rows, f"{name}: {key}"))
    return tables


def image_url(path: Path) -> str:
    """``path`` (a PNG) as a data URL, which the Prefect UI shows (see the module docstring)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_artifacts(name: str, files: list[Path], limit: int = 8) -> list[Artifact]:
    """An image artifact per PNG file (the first ``limit``, those that exist and are not huge)."""
    out = []
    for path in files:
        path = Path(path)
        if len(out) >= limit:
            break
        if path.suffix.lower() != ".png" or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
            continue
        out.append(Artifact("image", artifact_key(name, path.stem), image_url(path), f"`{path}`"))
    return out


# The images each stage leaves for a person to look at, from its result (wiring: paths only).
STAGE_IMAGES: dict[str, Callable[[dict[str, Any]], list[Path]]] = {
    "train": lambda r: [Path(r["model_path"]).with_name("augmentation_preview.png")],
    "evaluate": lambda r: sorted(Path(r["plots_dir"]).glob("*.png")),
    "explain": lambda r: [Path(f) for f in r.get("files") or []],
}

# Reports a stage writes that are best read in a browser: (result field, link text).
STAGE_LINKS: dict[str, tuple[str, str]] = {
    "quality": ("data_docs", "Great Expectations Data Docs (every validation)"),
}


def stage_artifacts(name: str, result: dict[str, Any], *, failed: bool = False) -> list[Artifact]:
    """Everything a stage's result posts: its fields, its lists, its images, its report link."""
    title = f"{name} stage" + (" FAILED" if failed else "")
    out = [Artifact("table", artifact_key("stage", name), field_rows(result), f"result of the {title}")]
    out += list_tables(name, result)
    pick = STAGE_IMAGES.get(name)
    if pick is not None:
        try:
            out += image_artifacts(name, pick(result))
        except (KeyError, TypeError):  # a result without the paths: nothing to show
            pass
    if name in STAGE_LINKS and result.get(STAGE_LINKS[name][0]):
        field, text = STAGE_LINKS[name]
        path = Path(result[field])
        out.append(Artifact("link", artifact_key(name, "report"), path.as_uri(), f"`{path}`", link_text=text))
    return out


_REPRO_LINES = ("Running stage", "Stage '", "Generating lock file", "Updating lock file",
                "Data and pipelines are up to date")


def summarize_repro(output: str) -> str:
    """DVC's own lines from ``dvc repro`` output (ran or skipped, lock updated), not the stage's."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(_REPRO_LINES)]
    return "; ".join(lines) if lines else output.strip()[-500:]
