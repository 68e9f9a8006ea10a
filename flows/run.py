"""Run one of medops' flows once, from the shell: ``python -m flows.run NAME [--project DIR]``.

NAME is ``ingest-studies`` or ``training-pipeline``; the flow's result is printed as JSON. This is
what ``make demo`` runs (in a process of its own, with the Prefect server's environment).
"""

import argparse
import json
import sys
from typing import Callable, Sequence


def _flows() -> dict[str, Callable[..., dict]]:
    from flows.ingest import ingest_studies
    from flows.training import training_pipeline

    return {"ingest-studies": ingest_studies, "training-pipeline": training_pipeline}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__.splitlines()[0])
    parser.add_argument("flow", choices=("ingest-studies", "training-pipeline"))
    parser.add_argument("--project", help="project root (default: $MEDOPS_ROOT or the current folder)")
    args = parser.parse_args(argv)
    result = _flows()[args.flow](project_root=args.project)
    print(json.dumps(result, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
