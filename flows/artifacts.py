"""What the flows post to the Prefect UI: stage results as markdown tables, a stage's PNG files,
and DVC's own lines from ``dvc repro`` output. Rendering only: no Prefect calls here."""

import json
from pathlib import Path
from typing import Any


def render_images(title: str, files: list[str], limit: int = 8) -> str:
    """PNG files embedded in markdown (data URIs), so the Prefect UI shows them with the run."""
    import base64

    out = [f"# {title}", ""]
    for name in files[:limit]:
        path = Path(name)
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        out += [f"### {path.name}", "", f"![{path.name}](data:image/png;base64,{data})", ""]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        text = text if len(text) <= 200 else text[:197] + "..."
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, result: dict[str, Any]) -> str:
    """A stage result as markdown: scalars in a key/value table, lists of strings as bullets,
    lists of records (e.g. the quality expectations) as their own tables."""
    out = [f"# {title}", "", "| | |", "|---|---|"]
    sections: list[str] = []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for row in value for k in row))
            sections += ["", f"## {key}", "", "| " + " | ".join(cols) + " |",
                         "|" + "---|" * len(cols)]
            sections += ["| " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |" for row in value]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            sections += ["", f"## {key}", ""] + [f"- {_cell(v)}" for v in value]
        else:
            out.append(f"| {key} | {_cell(value)} |")
    return "\n".join(out + sections) + "\n"


_REPRO_LINES = ("Running stage", "Stage '", "Generating lock file", "Updating lock file",
                "Data and pipelines are up to date")


def summarize_repro(output: str) -> str:
    """DVC's own lines from ``dvc repro`` output (ran or skipped, lock updated), not the stage's."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(_REPRO_LINES)]
    return "; ".join(lines) if lines else output.strip()[-500:]
