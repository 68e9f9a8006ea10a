"""Serve the training flow as a Prefect deployment (long-running): ``python -m flows.serve``.

The deployment is named ``params.prefect.deployment_name``; users start runs from the Prefect UI
(or ``prefect deployment run training-pipeline/<name>``) with edited parameters. The process talks
to the server named by PREFECT_API_URL (medops.ops.prefect_server.prefect_env) and runs the flow in the
project found from $MEDOPS_ROOT or the current folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from medops.config import load_params
from medops.paths import ProjectPaths


def describe(params_path: Path) -> str:
    """The deployment's description: what it does, and params.yaml's values when it was served."""
    from flows.training import UI_PARAMETERS

    values = load_params(params_path).model_dump()
    current = ", ".join(f"{d.split('.')[1]}={values[d.split('.')[0]][d.split('.')[1]]}" for d in UI_PARAMETERS)
    return (
        "Version data/raw with DVC, reproduce every stage (dvc repro --single-item), deploy to Triton "
        f"if the gate passes. Empty parameters keep params.yaml's values; when served: {current}."
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="project root (default: $MEDOPS_ROOT or the nearest params.yaml)")
    args = parser.parse_args(argv)

    from flows.training import training_pipeline

    paths = ProjectPaths.discover(Path(args.project) if args.project else None)
    params = load_params(paths.params)
    training_pipeline.serve(
        name=params.prefect.deployment_name,
        parameters={"project_root": str(paths.root)},
        description=describe(paths.params),
        tags=["medops"],
        limit=1,  # one pipeline at a time: stages share the project's files and DVC's lock
    )


if __name__ == "__main__":
    main()
