"""The ``medops`` command. Each subcommand parses, loads config, calls one library function and
returns a Report (a summary for people, one JSON object for ``--json``, an exit code); ``main``
prints it and maps medops' errors to the exit codes of ``medops.errors.ExitCode``. ``main(argv)``
is testable in-process.

With ``--json``, stdout carries that one object and nothing else: what the command itself would
print (Keras, Great Expectations) goes to stderr meanwhile, as do progress bars, which are drawn
only when stderr is a terminal. A failed command prints ``{"error": {...}}`` instead.

Heavy modules (TensorFlow, Prefect, tritonclient) are imported inside the subcommand that needs
them, so ``medops predict`` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import medops
from medops.atomic import write_bytes
from medops.config import Params, load_params, with_cluster
from medops.errors import ConfigError, ExitCode, MedopsError, exit_code_for
from medops.paths import BUNDLED_DATASET, ProjectPaths

Progress = Callable[[int, int], None]


@dataclass
class Report:
    """What a subcommand has to say: ``text`` for people, ``data`` for ``--json``."""

    text: str
    data: dict[str, Any]
    code: ExitCode = ExitCode.OK


def _context(args: argparse.Namespace) -> tuple[ProjectPaths, Params]:
    paths = ProjectPaths.discover(Path(args.project) if args.project else None)
    return paths, load_params(paths.params)


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "file", *, enabled: bool = True,
                 stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A tqdm bar on ``stream`` (default stderr) as a ``progress(done, total)`` callback, or None
    (no bar) when not ``enabled`` or when ``stream`` is not a terminal: pipes, CI logs and
    ``--json`` consumers get no carriage-return noise."""
    stream = stream if stream is not None else sys.stderr
    if not enabled or not stream.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=stream, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# --- subcommands ------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> Report:
    from medops.dicom import synth

    paths, params = _context(args)
    out = Path(args.out) if args.out else paths.export(params.ingest.source)
    if args.add:
        result = synth.add_studies(params.synth, source_npz=Path(args.source or BUNDLED_DATASET),
                                   out_dir=out, n=args.add)
        return Report(f"added {result.files} DICOM files in {result.studies} new studies of "
                      f"{result.patients} patients to {result.dicom_dir}, labels in {result.manifest}",
                      result.model_dump(mode="json"))
    with progress_bar("synth") as bar:
        result = synth.run(params.synth, source_npz=Path(args.source or BUNDLED_DATASET),
                           out_dir=out, progress=bar)
    return Report(f"wrote {result.files} DICOM files for {result.patients} patients to "
                  f"{result.dicom_dir} and labels to {result.manifest}",
                  result.model_dump(mode="json"))


def cmd_ingest(args: argparse.Namespace) -> Report:
    from medops.stages import ingest
    from medops.pipeline import deid_key

    paths, params = _context(args)
    params = with_cluster(params, args.cluster)
    cfg = params.ingest
    if args.workers:
        cfg = cfg.model_copy(update={"workers": args.workers})
    if args.source is None:  # the project's own data path: export folder -> versioned dataset
        from medops.pipeline import ingest_export

        if args.out or args.manifest:
            raise ConfigError("--out and --manifest go with a SOURCE folder; without one, medops "
                              "ingests the project's export folder (ingest.source)")
        with progress_bar("ingest", enabled=not args.quiet) as bar:
            intake = ingest_export(params.model_copy(update={"ingest": cfg}), paths, progress=bar,
                                   full=args.full)
        summary = ingest.format_summary(intake.result)
        summary += (f"\npublished the de-identified dataset to {paths.ingested}"
                    if intake.published else f"\n{paths.ingested} unchanged")
        return Report(summary, {**intake.result.model_dump(mode="json"),
                                "dataset": str(paths.ingested), "published": intake.published})
    if not args.out:
        raise ConfigError("medops ingest SOURCE needs --out OUT")
    if args.full:
        cfg = cfg.model_copy(update={"incremental": False})
    with progress_bar("ingest", enabled=not args.quiet) as bar:
        result = ingest.run(
            cfg,
            source_dir=Path(args.source),
            out_dir=Path(args.out),
            manifest=Path(args.manifest) if args.manifest else None,
            key=deid_key(params, paths),
            progress=bar,
        )
    return Report(ingest.format_summary(result), result.model_dump(mode="json"))


def cmd_deid_report(args: argparse.Namespace) -> Report:
    import os

    from medops.dicom import deid_report

    key = None
    if args.source:  # pairing needs the key ingest used; never create one here
        paths, params = _context(args)
        cfg = params.ingest.deid
        if not os.environ.get(cfg.key_env) and not (paths.state / "secrets" / "deid.key").is_file():
            raise ConfigError(f"--source needs the de-identification key ingest used: set "
                              f"${cfg.key_env} or keep {paths.state}/secrets/deid.key")
        from medops.pipeline import deid_key

        key = deid_key(params, paths)
    report = deid_report.report_folder(Path(args.folder), source=Path(args.source) if args.source else None,
                                       key=key)
    if report.files == 0:
        raise ConfigError(f"no DICOM files below {args.folder}")
    return Report(deid_report.format_report(report), report.to_dict(),
                  ExitCode.FAILURE if report.findings or report.unreadable_outputs else ExitCode.OK)


def cmd_dataset_get(args: argparse.Namespace) -> Report:
    from medops.data import find_row, read_deidentified
    from medops.errors import IngestError

    paths, _ = _context(args)
    dataset = Path(args.dataset) if args.dataset else paths.ingested
    if not (dataset / "metadata.parquet").is_file():
        raise IngestError(f"{dataset} holds no ingested dataset (no metadata.parquet): run `medops ingest` "
                        f"or `dvc pull` first, or name one with --dataset")
    row = find_row(dataset, args.uid)
    if row is None:
        raise IngestError(f"no image with SOP Instance UID {args.uid} in {dataset} (UIDs in a dataset are "
                        f"the pseudonymous ones of metadata.parquet)")
    data = read_deidentified(dataset, row)
    out = Path(args.out) if args.out else Path(f"{args.uid}.dcm")
    write_bytes(out, data)
    info = {"sop_instance_uid": args.uid, "out": str(out), "bytes": len(data), "shard": row["shard"],
            "deid_path": row["deid_path"], "dataset": str(dataset)}
    return Report(f"wrote {out} ({len(data)} bytes; {row['deid_path']} of shard {row['shard']})", info)


def cmd_stage(args: argparse.Namespace) -> Report:
    from medops.pipeline import run_stage

    paths, params = _context(args)
    payload = run_stage(args.name, params, paths)
    return Report(json.dumps(payload, indent=2, sort_keys=True), payload)


def cmd_recover(args: argparse.Namespace) -> Report:
    from medops.ops import dvc

    paths, _ = _context(args)
    done = dvc.recover_lockfile(paths.root)
    if done is None:
        return Report("dvc.lock is whole (or absent): nothing to recover", {"recovered": False})
    how = (f"put back {done['restored_from']}, the copy taken when the last stage started"
           if done["restored_from"] else "no copy to put back: moved it aside, so DVC reruns "
           "the stages it cannot vouch for")
    return Report(f"dvc.lock was cut short ({done['problem']}); {how}; the cut file is "
                  f"{done['cut_file']}", {"recovered": True, **done})


def cmd_stages(args: argparse.Namespace) -> Report:
    from medops.pipeline import STAGES

    rows = [{"name": s.name, "module": s.module, "params": list(s.sections)} for s in STAGES.values()]
    return Report("\n".join(f"{r['name']:10s} {r['module']:18s} params: {', '.join(r['params'])}"
                            for r in rows),
                  {"stages": rows})


def cmd_version_data(args: argparse.Namespace) -> Report:
    from medops.ops import dvc

    paths, _ = _context(args)
    version = dvc.version_dataset(paths.root, paths.ingested, push=not args.no_push)
    rel = paths.ingested.relative_to(paths.root)
    return Report(f"{rel} is at data version {version}",
                  {"path": str(rel), "data_version": version, "pushed": not args.no_push})


def cmd_serve(args: argparse.Namespace) -> Report:
    from medops.serving import server

    paths, params = _context(args)
    cfg = params.serving
    from medops.ops import supervise

    if args.action in ("start", "stop") and supervise.is_supervised(paths):
        return _serve_supervised(args.action, paths, params)
    if args.action == "stop":
        stopped = server.stop_server(paths.state)
        return Report("Triton stopped" if stopped else "Triton was not running", {"stopped": stopped})
    if args.action == "history":
        return _serve_history(cfg.repository_path(paths.root), args.limit)
    if args.action == "status":
        status = server.server_status(paths.state)
        return Report(status.describe(), status.model_dump(mode="json"),
                      ExitCode.OK if status.ready else ExitCode.UNAVAILABLE)
    info = server.start_server(cfg, repository=cfg.repository_path(paths.root), state_dir=paths.state,
                               admin_key=server.resolve_admin_key(cfg, state_dir=paths.state, create=True))
    return Report(f"Triton ready: HTTP {info.http_url}, gRPC {info.grpc_url}, "
                  f"metrics {info.metrics_url} (pid {info.pid}, repository {info.repository})",
                  {**info.model_dump(mode="json"), "http_url": info.http_url,
                   "grpc_url": info.grpc_url, "metrics_url": info.metrics_url})


def _serve_supervised(action: str, paths: ProjectPaths, params: Params) -> Report:
    """``medops serve start|stop`` while supervisord keeps Triton: through supervisord, so a
    stopped Triton stays stopped and a started one is kept alive again."""
    from medops.ops import supervise
    from medops.serving import server

    was = server.server_status(paths.state)
    supervise.control(paths, "triton", action)
    if action == "stop":
        return Report("Triton stopped (supervisord keeps it stopped until `medops serve start`)"
                      if was.running else "Triton was not running", {"stopped": was.running})
    supervise.wait_started(paths, params, ["triton"], params.serving.startup_timeout_s)
    info = server.server_status(paths.state).info
    return Report(f"Triton ready under supervisord (pid {info.pid if info else '?'})",
                  {**(info.model_dump(mode="json") if info else {}), "supervised": True})


def cmd_status(args: argparse.Namespace) -> Report:
    from medops.ops import supervise

    paths, params = _context(args)
    rows = supervise.services_status(paths, params)
    supervised = supervise.is_supervised(paths)
    head = (f"supervisord: running (pid {supervise.supervisord_pid(paths)})" if supervised
            else "supervisord: not running (`medops up` or `make demo` start it)")
    down = [r.name for r in rows if not r.running]
    return Report(head + "\n" + supervise.format_status(rows),
                  {"supervisor": {"running": supervised, "pid": supervise.supervisord_pid(paths),
                                  "config": str(supervise.conf_path(paths))},
                   "services": [r.model_dump(mode="json") for r in rows]},
                  ExitCode.UNAVAILABLE if down or not rows else ExitCode.OK)


def _serve_history(repository: Path, limit: int | None) -> Report:
    """Every deploy and rollback recorded in the repository's audit log, oldest first."""
    from medops.serving.audit import audit_log, history

    entries = history(repository, limit)
    lines = [f"{e['time']}  {e['action']:8s} {e['outcome']:11s} "
             f"{e.get('model_name') or '?'} v{e.get('version', '?')}"
             f"{'' if e.get('previous_version') is None else ' (was v%s)' % e['previous_version']}"
             f"  by {e['by']}" + (f" ({e['os_user']}@{e['host']})" if e['by'] != e['os_user'] else "")
             + (f": {e['reason']}" if e.get("reason") else "")
             + (f"  [{e['error']}]" if e.get("error") else "") for e in entries]
    text = "\n".join(lines) if lines else f"no deploy or rollback recorded in {audit_log(repository)}"
    return Report(text, {"log": str(audit_log(repository)), "entries": entries})


def cmd_deploy(args: argparse.Namespace) -> Report:
    from medops.pipeline import serving_kwargs
    from medops.serving.deploy import deploy

    paths, params = _context(args)
    result = deploy(params.serving, onnx=paths.onnx_model, gate=paths.gate,
                    export_result=paths.export_result, url=args.url, protocol=args.protocol,
                    by=args.by, reason=args.reason, verify=not args.no_verify,
                    **serving_kwargs(params, paths))
    if not result.unchanged:
        from medops.ops.lineage import record_deployment

        record_deployment(paths, result.model_dump(mode="json"))
    what = "already serving" if result.unchanged else "deployed"
    flavour = "" if result.flavour == "embedded" else f", {result.flavour} flavour"
    unchecked = ("" if result.verified_by != "none" else
                 "; no server checked it (--no-verify): a server loads it when it starts")
    return Report(f"{what} {result.model_name} version {result.version} "
                  f"(data version {result.data_version}{flavour}){unchecked}",
                  result.model_dump(mode="json"))


def cmd_lineage(args: argparse.Namespace) -> Report:
    from medops.ops import lineage

    paths, params = _context(args)
    if args.patient:
        found = lineage.patient_lineage(paths, args.patient)
        lines = [f"patient {found['patient_id']}:"]
        lines += [f"  data version {d['data_version']}: {d['images']} image(s)" for d in found["data_versions"]]
        lines += [f"  model {m['model_name']} version {m['model_version']} (data version {m['data_version']})"
                  for m in found["model_versions"]]
        if len(lines) == 1:
            lines.append("  in no data version DVC holds, and in no recorded model")
        return Report("\n".join(lines), found)
    cfg = params.serving
    record = lineage.model_lineage(paths, cfg.repository_path(paths.root), cfg.model_name, args.version)
    rows = [("model version", record["model_version"]), ("data version", record["data_version"]),
            ("code commit", record["code_commit"]), ("flow run", record["flow_run_id"]),
            ("gate", "passed" if record["gate"]["passed"] else "refused"),
            ("test AUC", record["quality"].get("auc")), ("deployed", record["deployed"])]
    return Report("\n".join(f"{k:14s} {v}" for k, v in rows), record)


def cmd_rollback(args: argparse.Namespace) -> Report:
    from medops.pipeline import serving_kwargs
    from medops.serving.deploy import rollback

    paths, params = _context(args)
    result = rollback(params.serving, url=args.url, protocol=args.protocol, to_version=args.to,
                      by=args.by, reason=args.reason, verify=not args.no_verify,
                      **serving_kwargs(params, paths))
    return Report(f"{result.model_name}: version {result.from_version} -> {result.to_version} "
                  "now serving", result.model_dump(mode="json"))


def cmd_predict(args: argparse.Namespace) -> Report:
    from medops.serving import client
    from medops.serving.server import endpoint

    paths, params = _context(args)
    cfg = params.serving
    url = args.url or endpoint(cfg, args.protocol)
    model = args.model or cfg.model_name
    with progress_bar("predict") as bar:
        preds = client.predict_files(
            [Path(f) for f in args.files],
            url=url,
            protocol=args.protocol,
            model_name=model,
            preprocessing=params.ingest.preprocessing,
            via=args.via,
            progress=bar,
            ood_action=cfg.ood_action,
        )
    failed = sum(p.error is not None for p in preds)
    # a file that got no answer is a bad input (not DICOM, too large, undecodable); the others are
    # still answered, and the exit code says that not all were
    return Report(client.format_predictions(preds),
                  {"url": url, "protocol": args.protocol, "model": model, "via": args.via,
                   "failed": failed, "predictions": [p.model_dump(mode="json") for p in preds]},
                  ExitCode.BAD_INPUT if failed else ExitCode.OK)


def cmd_monitor(args: argparse.Namespace) -> Report:
    from medops.ops.monitor import monitor, to_json

    paths, params = _context(args)
    result, _, _ = monitor(params.monitor, log_dir=params.serving.record_path(paths.state),
                           reference=paths.drift_reference, window=args.window)
    return Report(result.summary(), to_json(result),
                  ExitCode.FAILURE if result.drift else ExitCode.OK)


def cmd_watch(args: argparse.Namespace) -> Report:
    from medops.ops.watch import run_watch

    paths, params = _context(args)
    export = paths.export(params.ingest.source)
    run_watch(export, quiet_s=args.quiet_s, inotify=args.inotify,
              log=lambda line: print(line, file=sys.stderr, flush=True))
    return Report("stopped watching", {"export": str(export)})


def cmd_up(args: argparse.Namespace) -> Report:
    from medops.ops import demo

    from medops.ops import supervise

    paths, params = _context(args)
    lines = supervise.start_supervisor(paths, params, args.services or supervise.ALL_SERVICES)
    return Report("\n".join(lines), {"lines": lines})


def cmd_down(args: argparse.Namespace) -> Report:
    from medops.ops import demo

    paths, _ = _context(args)
    lines = demo.stop_services(paths)
    return Report("\n".join(lines), {"lines": lines})


def cmd_demo(args: argparse.Namespace) -> Report:
    from medops.ops import demo

    paths, params = _context(args)
    text = demo.run_demo(paths, params)
    return Report(text, {"summary": text})


# --- parser -----------------------------------------------------------------------------------

def exit_codes_epilog() -> str:
    """The table of exit codes, as ``medops --help`` ends (the README holds the same table)."""
    import textwrap

    return "exit codes:\n" + "\n".join(
        textwrap.fill(code.meaning, width=79, initial_indent=f"  {code.value:<4d} ",
                      subsequent_indent=" " * 7, break_on_hyphens=False)
        for code in ExitCode)


def _add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="a folder to ingest into --out (default: ingest.source, "
                                             "into the project's dataset)")
    p.add_argument("--out", help="output folder (with SOURCE)")
    p.add_argument("--manifest", help="labels CSV/Parquet keyed by SOPInstanceUID or relative path")
    p.add_argument("--workers", type=int, help="decoding processes (default: params ingest.workers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless "
                                                        "stderr is a terminal)")
    p.add_argument("--full", action="store_true", help="rebuild everything, even files seen before")
    p.add_argument("--cluster", help="where files are decoded: none (a local process pool), local (a "
                                     "Dask LocalCluster of --workers processes) or a Dask scheduler "
                                     "address tcp://host:8786 (default: params ingest.cluster)")


def _add_dataset_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    """``medops dataset get UID``: a command group of its own (more ways to read a dataset may come)."""
    p = add("dataset", cmd_dataset_get, "read an ingested dataset", json_flag=False)
    dataset_sub = p.add_subparsers(dest="dataset_command", required=True)
    p = dataset_sub.add_parser("get", help="write one de-identified DICOM file, found by its SOP "
                                           "Instance UID, from its shard's pack",
                               description="write one de-identified DICOM file, found by its "
                                           "(pseudonymous) SOP Instance UID, from its shard's pack")
    p.set_defaults(func=cmd_dataset_get)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (and nothing else there)")
    p.add_argument("uid", help="the SOP Instance UID, as in metadata.parquet")
    p.add_argument("--out", help="file to write (default: ./UID.dcm)")
    p.add_argument("--dataset", help="the ingested folder (default: data/ingested)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medops", description=__doc__.splitlines()[0],
                                     epilog=exit_codes_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medops {medops.__version__}")
    parser.add_argument("--project", help="project root (default: nearest folder with params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], Report], help: str, *,
            json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true",
                           help="print one JSON object on stdout (and nothing else there)")
        return p

    _add_data_commands(add)
    _add_serving_commands(add)
    return parser


AddCommand = Callable[..., argparse.ArgumentParser]


def _add_data_commands(add: AddCommand) -> None:
    """The data side: synth, ingest, the stages, DVC."""
    p = add("synth", cmd_synth, "turn the bundled PneumoniaMNIST into a DICOM export with synthetic PHI")
    p.add_argument("--source", help="npz file (default: the bundled dataset)")
    p.add_argument("--out", help="output folder (default: the export folder, ingest.source)")
    p.add_argument("--add", type=int, metavar="N",
                   help="add N new labelled patients' studies to the export (a new delivery, with "
                        "its own labels-add-K.csv) instead of writing the export")

    _add_ingest_arguments(add("ingest", cmd_ingest, "de-identify, decode and prepare every DICOM file "
                                                    "below SOURCE (default: the project's export folder, "
                                                    "published to data/ingested)"))
    _add_dataset_parser(add)

    p = add("deid-report", cmd_deid_report, "what de-identification did to each attribute, with "
                                            f"counts, and what is left (exits {ExitCode.FAILURE.value})")
    p.add_argument("folder", help="ingest's output folder (its dicom/) or a folder of de-identified files")
    p.add_argument("--source", help="the original export: compare each original with its de-identified file")

    p = add("stage", cmd_stage, "run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name")
    add("stages", cmd_stages, "list the pipeline stages")
    add("recover", cmd_recover, "put back a dvc.lock that a crash cut short (the copy the last "
                                "stage took), so `dvc repro` runs again")

    p = add("version-data", cmd_version_data, "track the de-identified dataset (data/ingested) with DVC "
                                               "and push it to the default remote")
    p.add_argument("--no-push", action="store_true")


def _add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="write and pin the version without a server's golden check (for a "
                        "production repository whose GPU Triton is not reachable from here; it "
                        "loads the version when it starts); recorded as verified_by none")


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", help="who asks for it, for the audit log (default: the OS user)")
    p.add_argument("--reason", help="why, for the audit log (medops serve history)")


def _add_serving_commands(add: AddCommand) -> None:
    """The serving side: Triton, deploy, lineage, rollback, predict; the watcher and the demo."""
    p = add("serve", cmd_serve, "start (default), stop or inspect the embedded Triton server; "
                                f"status exits {ExitCode.UNAVAILABLE.value} unless it is ready; "
                                "history lists every deploy and rollback (who, when, what, why, outcome)")
    p.add_argument("action", nargs="?", choices=["start", "stop", "status", "history"], default="start")
    p.add_argument("--limit", type=int, help="history: only the last N entries")

    p = add("deploy", cmd_deploy, "deploy the exported model to the running Triton, if the gate passed "
                                  "(serving.flavor: embedded or production)")
    p.add_argument("--url", help="Triton address (default: from params serving)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    _add_verify_arg(p)
    _add_audit_args(p)

    p = add("lineage", cmd_lineage, "where the served model (or --version N) came from: data version, "
                                    "code commit, params, flow run, gate; or, with --patient, every data "
                                    "version and model version holding a patient's images")
    p.add_argument("--version", type=int, help="a model version (default: the served one)")
    p.add_argument("--patient", help="a pseudonymous patient ID, as the dataset's patient_id column has it")

    p = add("rollback", cmd_rollback, "serve the previous (or a given) model version again")
    p.add_argument("--to", type=int, help="version to serve (default: the one before the served one)")
    p.add_argument("--url", help="Triton address (default: from params serving)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    _add_verify_arg(p)
    _add_audit_args(p)

    p = add("predict", cmd_predict, "classify DICOM files with the model served by Triton")
    p.add_argument("files", nargs="+")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--url", help="Triton address, host:port (default: params serving host and port)")
    p.add_argument("--model", help="model name (default: params serving.model_name)")
    p.add_argument("--via", choices=["ensemble", "tensor"], default="ensemble",
                   help="ensemble: send the DICOM bytes, Triton preprocesses (default); "
                        "tensor: preprocess here and call the classifier directly")

    p = add("monitor", cmd_monitor, "compare the last N served images (the drift log) with the "
                                    "training reference; exits 1 when a drift test fires")
    p.add_argument("--window", type=int, metavar="N", help="images (default: params monitor.window)")

    # the demo's own commands report progress lines, nothing for a script to parse
    p = add("watch", cmd_watch, "emit the Prefect event medops.export.changed when studies land in "
                                "the export folder (once per delivery); runs until stopped",
            json_flag=False)
    p.add_argument("--quiet-s", type=float, default=3.0,
                   help="seconds without a new file event that end a delivery (default 3)")
    p.add_argument("--inotify", action="store_true",
                   help="follow the kernel's file events instead of scanning the folder every second "
                        "(for exports too large to scan; can miss deliveries when its queue overflows)")
    p = add("up", cmd_up, "start supervisord with the Prefect server, Triton, the deployments and "
                          "the export folder watcher (reusing running ones); each is restarted "
                          "when it dies", json_flag=False)
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help="only these of prefect, triton, deployments, watcher (default: all four)")
    add("down", cmd_down, "stop what `medops up` / `make demo` started: supervisord and its "
                          "services, and any server left by recorded pid", json_flag=False)
    add("status", cmd_status, "each service `make demo` runs: state, pid, uptime, restarts, health "
                              f"(exits {ExitCode.UNAVAILABLE.value} unless all run)")
    add("demo", cmd_demo, "the whole demo: data, servers, the training flow, deployment",
        json_flag=False)


def _print_json(data: dict[str, Any], stream: TextIO) -> None:
    print(json.dumps(data, sort_keys=True), file=stream)


def _error_object(exc: BaseException, code: ExitCode) -> dict[str, Any]:
    return {"error": {"code": int(code), "type": type(exc).__name__, "message": str(exc)}}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medops`` with ``argv`` (default: the command line); returns the exit code.

    A MedopsError is one line on stderr and its class's exit code; any other exception is a bug
    and goes on up (Python prints the traceback and exits 1, ``ExitCode.FAILURE``).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2): argparse has printed
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    as_json = getattr(args, "json", False)
    stdout = sys.stdout
    try:
        # with --json, whatever the libraries print goes to stderr: stdout is the object alone
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            report = args.func(args)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except MedopsError as exc:
        print(f"medops {args.command}: error: {exc}", file=sys.stderr)
        if as_json:
            _print_json(_error_object(exc, exc.exit_code), stdout)
        return int(exc.exit_code)
    except Exception as exc:
        if as_json:  # a script still gets its one object; the traceback follows on stderr
            _print_json(_error_object(exc, exit_code_for(exc)), stdout)
        raise
    if as_json:
        _print_json(report.data, stdout)
    elif report.text:
        print(report.text, file=stdout)
    return int(report.code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
