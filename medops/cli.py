"""The ``medops`` command. Each subcommand parses, loads config, calls one library function, prints
a summary and returns an exit code; ``main(argv)`` is testable in-process.

Heavy modules (TensorFlow, Prefect, tritonclient) are imported inside the subcommand that needs
them, so ``medops predict`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from medops.config import Params, load_params
from medops.errors import MedopsError
from medops.paths import BUNDLED_DATASET, ProjectPaths


def _context(args: argparse.Namespace) -> tuple[ProjectPaths, Params]:
    paths = ProjectPaths.discover(Path(args.project) if args.project else None)
    return paths, load_params(paths.params)


# --- subcommands ------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from medops.dicom import synth

    paths, params = _context(args)
    out = Path(args.out) if args.out else paths.raw
    result = synth.run(params.synth, source_npz=Path(args.source or BUNDLED_DATASET), out_dir=out)
    print(f"wrote {result.files} DICOM files for {result.patients} patients to {out}/dicom "
          f"and labels to {out}/labels.csv")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from medops import ingest
    from medops.pipeline import deid_key

    paths, params = _context(args)
    cfg = params.ingest
    if args.workers:
        cfg = cfg.model_copy(update={"workers": args.workers})
    if args.full:
        cfg = cfg.model_copy(update={"incremental": False})
    result = ingest.run(
        cfg,
        source_dir=Path(args.source),
        out_dir=Path(args.out),
        manifest=Path(args.manifest) if args.manifest else None,
        key=deid_key(params, paths),
        progress=not args.quiet,
    )
    print(ingest.format_summary(result))
    return 0


def cmd_deid_report(args: argparse.Namespace) -> int:
    import os

    from medops.dicom import deid_report

    key = None
    if args.source:  # pairing needs the key ingest used; never create one here
        paths, params = _context(args)
        cfg = params.ingest.deid
        if not os.environ.get(cfg.key_env) and not (paths.state / "secrets" / "deid.key").is_file():
            raise MedopsError(f"--source needs the de-identification key ingest used: set "
                              f"${cfg.key_env} or keep {paths.state}/secrets/deid.key")
        from medops.pipeline import deid_key

        key = deid_key(params, paths)
    report = deid_report.report_folder(Path(args.folder), source=Path(args.source) if args.source else None,
                                       key=key)
    if report.files == 0:
        raise MedopsError(f"no DICOM files below {args.folder}")
    print(json.dumps(report.to_dict(), indent=2) if args.json else deid_report.format_report(report))
    return 1 if report.findings else 0


def cmd_stage(args: argparse.Namespace) -> int:
    from medops.pipeline import run_stage

    paths, params = _context(args)
    payload = run_stage(args.name, params, paths)
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from medops.pipeline import STAGES

    for stage in STAGES.values():
        print(f"{stage.name:10s} {stage.module:18s} params: {', '.join(stage.sections)}")
    return 0


def cmd_version_data(args: argparse.Namespace) -> int:
    from medops import dvc

    paths, _ = _context(args)
    version = dvc.version_dataset(paths.root, paths.raw, push=not args.no_push)
    print(f"{paths.raw.relative_to(paths.root)} is at data version {version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from medops.serving import server

    paths, params = _context(args)
    cfg = params.serving
    if args.action == "stop":
        stopped = server.stop_server(paths.state)
        print("Triton stopped" if stopped else "Triton was not running")
        return 0
    if args.action == "status":
        print(server.server_status(paths.state))
        return 0
    info = server.start_server(cfg, repository=cfg.repository_path(paths.root), state_dir=paths.state,
                               admin_key=server.resolve_admin_key(cfg, state_dir=paths.state, create=True))
    print(f"Triton ready: HTTP {cfg.host}:{cfg.http_port}, gRPC {cfg.grpc_url}, "
          f"metrics {cfg.host}:{cfg.metrics_port} (pid {info.pid}, repository {info.repository})")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from medops.pipeline import serving_kwargs
    from medops.serving.deploy import deploy

    paths, params = _context(args)
    result = deploy(params.serving, onnx=paths.onnx_model, gate=paths.gate,
                    export_result=paths.export_result, url=args.url, protocol=args.protocol,
                    **serving_kwargs(params, paths))
    print(f"deployed {result.model_name} version {result.version} (data version {result.data_version})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from medops.pipeline import serving_kwargs
    from medops.serving.deploy import rollback

    paths, params = _context(args)
    result = rollback(params.serving, url=args.url, protocol=args.protocol, to_version=args.to,
                      **serving_kwargs(params, paths))
    print(f"{result.model_name}: version {result.from_version} -> {result.to_version} now serving")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medops import client
    from medops.serving.server import endpoint

    paths, params = _context(args)
    cfg = params.serving
    url = args.url or endpoint(cfg, args.protocol)
    preds = client.predict_files(
        [Path(f) for f in args.files],
        url=url,
        protocol=args.protocol,
        model_name=args.model or cfg.model_name,
        image_size=params.ingest.image_size,
        window=params.ingest.window,
        frame=params.ingest.frame,
        pixel_spacing=params.ingest.pixel_spacing,
        via=args.via,
    )
    if args.json:
        print(client.to_json_lines(preds), end="")
    else:
        print(client.format_predictions(preds))
    return 0 if all(p.error is None for p in preds) else 1


def cmd_up(args: argparse.Namespace) -> int:
    from medops import demo

    paths, params = _context(args)
    for line in demo.start_services(paths, params):
        print(line)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from medops import demo

    paths, _ = _context(args)
    for line in demo.stop_services(paths):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medops import demo

    paths, params = _context(args)
    print(demo.run_demo(paths, params))
    return 0


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medops", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="project root (default: nearest folder with params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "turn the bundled PneumoniaMNIST into a DICOM export with synthetic PHI")
    p.add_argument("--source", help="npz file (default: the bundled dataset)")
    p.add_argument("--out", help="output folder (default: data/raw)")

    p = add("ingest", cmd_ingest, "de-identify, decode and prepare every DICOM file below SOURCE")
    p.add_argument("source")
    p.add_argument("--out", required=True)
    p.add_argument("--manifest", help="labels CSV/Parquet keyed by SOPInstanceUID or relative path")
    p.add_argument("--workers", type=int, help="decoding processes (default: params ingest.workers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--full", action="store_true", help="rebuild everything, even files seen before")

    p = add("deid-report", cmd_deid_report,
            "what de-identification did to each attribute, with counts, and what is left (exit 1)")
    p.add_argument("folder", help="ingest's output folder (its dicom/) or a folder of de-identified files")
    p.add_argument("--source", help="the original export: compare each original with its de-identified file")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = add("stage", cmd_stage, "run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name")
    add("stages", cmd_stages, "list the pipeline stages")

    p = add("version-data", cmd_version_data, "track data/raw with DVC and push it to the default remote")
    p.add_argument("--no-push", action="store_true")

    p = add("serve", cmd_serve, "start (default), stop or inspect the embedded Triton server")
    p.add_argument("action", nargs="?", choices=["start", "stop", "status"], default="start")

    p = add("deploy", cmd_deploy, "deploy the exported model to the running Triton, if the gate passed")
    p.add_argument("--url", help="Triton address (default: from params serving)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")

    p = add("rollback", cmd_rollback, "serve the previous (or a given) model version again")
    p.add_argument("--to", type=int, help="version to serve (default: the one before the served one)")
    p.add_argument("--url", help="Triton address (default: from params serving)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")

    p = add("predict", cmd_predict, "classify DICOM files with the model served by Triton")
    p.add_argument("files", nargs="+")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--url", help="Triton address, host:port (default: params serving host and port)")
    p.add_argument("--model", help="model name (default: params serving.model_name)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--via", choices=["ensemble", "tensor"], default="ensemble",
                   help="ensemble: send the DICOM bytes, Triton preprocesses (default); "
                        "tensor: preprocess here and call the classifier directly")

    add("up", cmd_up, "start the Prefect server and Triton (reusing running ones)")
    add("down", cmd_down, "stop what `medops up` / `make demo` started, by recorded pid")
    add("demo", cmd_demo, "the whole demo: data, servers, the training flow, deployment")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MedopsError as exc:
        print(f"medops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
