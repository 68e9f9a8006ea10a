"""The production flavour written by deploy and rollback (serving.flavor: production), up to the
server: no Triton with the onnxruntime backend runs here (the wheel's tritonserver has the Python
backend only), so what deploy writes is parsed with Triton's own protobuf and checked against the
contract, and the rollout without a server (``--no-verify``) and the rollback are checked on the
files. A production deploy with no reachable server is refused (exit code UNAVAILABLE).

The models are tiny guarded ONNX graphs built here (probability = sigmoid(w * mean + b),
ood_score = |mean - 0.5| * k, in_distribution = ood_score <= 1), golden samples from real
PneumoniaMNIST images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medops.config import GateConfig, PreprocessSpec, ServingConfig
from medops.errors import ExitCode, ServerUnreachableError, ServingError
from medops.hashing import sha256_file
from medops.paths import BUNDLED_DATASET
from medops.serving.audit import history
from medops.serving.contract import build_contract
from medops.serving.deploy import deploy, rollback
from medops.serving.repository import list_versions, served_version
from medops.stages.gate import decide

S = 28
SPEC = PreprocessSpec(image_size=S)


def tiny_guarded_onnx(path: Path, *, w: float, b: float, k: float = 4.0) -> Path:
    """A guarded classifier as export writes one: outputs probability, ood_score, in_distribution."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Abs", ["centred"], ["distance"]),
        helper.make_node("Mul", ["distance", "k"], ["ood_score"]),
        helper.make_node("LessOrEqual", ["ood_score", "one"], ["in_distribution"]),
    ]
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [1], [v])
              for n, v in (("w", w), ("b", b), ("k", k), ("half", 0.5), ("one", 1.0))]
    graph = helper.make_graph(
        nodes, "tiny_guarded",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", S, S, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("in_distribution", TensorProto.BOOL, ["batch", 1])],
        consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def export_release(folder: Path, *, w: float, b: float, threshold: float, golden_shift: float = 0.0,
                   data_version: str = "dv-prod") -> dict[str, Path]:
    """model.onnx, golden.npz (worked out here, ``golden_shift`` added to the probabilities),
    export.json and a passed gate decision, as the pipeline leaves them."""
    onnx_path = tiny_guarded_onnx(folder / "model.onnx", w=w, b=b)
    with np.load(BUNDLED_DATASET) as data:
        images = (data["val_images"][:6].astype(np.float32) / 255.0)[..., None]
    means = images.reshape(len(images), -1).astype(np.float64).mean(axis=1)
    probs = 1.0 / (1.0 + np.exp(-(w * means + b))) + golden_shift
    scores = np.abs(means - 0.5) * 4.0
    np.savez(folder / "golden.npz", images=images, probabilities=probs.astype(np.float32)[:, None],
             ood_scores=scores.astype(np.float32)[:, None], in_distribution=(scores <= 1)[:, None])
    (folder / "export.json").write_text(json.dumps({
        "sha256": sha256_file(onnx_path), "data_version": data_version, "parity_atol": 1e-4,
        "decision_threshold": threshold}))
    metrics = {"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.8}
    (folder / "gate.json").write_text(
        decide(GateConfig(), metrics, {"data_version": data_version, "model": "tiny"}).model_dump_json())
    return {"onnx": onnx_path, "gate": folder / "gate.json", "export_result": folder / "export.json"}


def production(free_port, **extra) -> ServingConfig:
    return ServingConfig(flavor="production", grpc_port=free_port(), **extra)


def deploy_offline(cfg: ServingConfig, release: dict[str, Path], repo: Path, **kw):
    return deploy(cfg, **release, repository=repo, preprocessing=SPEC, verify=False, **kw)


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def configs(repo: Path) -> dict[str, bytes]:
    """Every config.pbtxt and model.py under the repository (what serves which version)."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.name in ("config.pbtxt", "model.py")}


DTYPES = {"TYPE_FP32": mc.TYPE_FP32, "TYPE_BOOL": mc.TYPE_BOOL}


def test_production_deploy_with_no_reachable_server_is_refused_unavailable(tmp_path, free_port):
    cfg, repo = production(free_port), tmp_path / "repo"
    release = export_release(tmp_path / "export", w=4.0, b=-2.0, threshold=0.5)
    with pytest.raises(ServerUnreachableError) as caught:
        deploy(cfg, **release, repository=repo, preprocessing=SPEC, timeout=5)
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert "--no-verify" in str(caught.value) and "golden" in str(caught.value)
    assert list_versions(repo, cfg.model_name) == []  # nothing written, nothing served
    assert not (repo / cfg.model_name / "config.pbtxt").exists()
    [entry] = history(repo)
    assert entry["outcome"] == "failed" and "--no-verify" in entry["error"]


def test_no_verify_writes_the_onnxruntime_gpu_classifier_the_contract_describes(tmp_path, free_port):
    cfg, repo = production(free_port, tensorrt_fp16=True), tmp_path / "repo"
    release = export_release(tmp_path / "export", w=4.0, b=-2.0, threshold=0.4)
    result = deploy_offline(cfg, release, repo, by="ops", reason="GPU rollout")
    assert (result.version, result.flavour, result.verified_by) == (1, "production", "none")
    version_dir = repo / cfg.model_name / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["deploy.json", "golden.npz", "model.onnx"]
    assert (version_dir / "model.onnx").read_bytes() == release["onnx"].read_bytes()
    assert not [p for p in (repo / cfg.model_name).iterdir() if p.name.startswith(".")]

    config, contract = parse(repo / cfg.model_name / "config.pbtxt"), build_contract(cfg, image_size=S)
    assert (config.name, config.platform, config.backend) == (cfg.model_name, "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == contract.max_batch_size
    for got, want in ((config.input, contract.inputs), (config.output, contract.outputs)):
        assert [(t.name, t.data_type, list(t.dims)) for t in got] == \
            [(s.name, DTYPES[s.data_type], list(s.dims)) for s in want]
    assert [o.name for o in config.output] == ["probability", "ood_score", "in_distribution"]
    assert list(config.version_policy.specific.versions) == [1]
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    assert sorted(w.batch_size for w in config.model_warmup) == sorted({1, *cfg.preferred_batch_sizes, cfg.max_batch_size})
    for warm in config.model_warmup:
        assert warm.inputs["image"].zero_data and list(warm.inputs["image"].dims) == [S, S, 1]
    [trt] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert list(config.dynamic_batching.preferred_batch_size) == cfg.preferred_batch_sizes

    ensemble = parse(repo / f"{cfg.model_name}_dicom" / "config.pbtxt")
    pinned = {s.model_name: s.model_version for s in ensemble.ensemble_scheduling.step}
    assert pinned[cfg.model_name] == pinned[f"{cfg.model_name}_postprocess"] == 1
    post = parse(repo / f"{cfg.model_name}_postprocess" / "config.pbtxt")
    assert post.parameters["threshold.1"].string_value == "0.4"
    [entry] = history(repo)
    assert (entry["outcome"], entry["flavour"], entry["verified_by"], entry["version"]) == \
        ("deployed", "production", "none", 1)
    assert entry["by"] == "ops" and entry["sha256"] == result.sha256


def test_production_rollback_restores_the_previous_versions_files(tmp_path, free_port):
    cfg, repo = production(free_port), tmp_path / "repo"
    deploy_offline(cfg, export_release(tmp_path / "e1", w=4.0, b=-2.0, threshold=0.4), repo)
    first = configs(repo)
    v2 = deploy_offline(cfg, export_release(tmp_path / "e2", w=-3.0, b=1.0, threshold=0.6), repo)
    second = configs(repo)
    assert v2.version == 2 and served_version(repo, cfg.model_name) == 2
    assert second[f"{cfg.model_name}/config.pbtxt"] != first[f"{cfg.model_name}/config.pbtxt"]

    back = rollback(cfg, repository=repo, preprocessing=SPEC, verify=False, reason="v2 misbehaves")
    assert (back.from_version, back.to_version, back.threshold, back.verified_by) == (2, 1, 0.4, "none")
    assert back.golden_max_abs_diff is not None and back.golden_max_abs_diff < 1e-4
    now = configs(repo)
    # every file that served v1 is back as it was; v2's files stay on disk, unserved
    assert {k: now[k] for k in first} == first
    assert served_version(repo, cfg.model_name) == 1 and list_versions(repo, cfg.model_name) == [1, 2]
    assert rollback(cfg, repository=repo, preprocessing=SPEC, verify=False, to_version=2).to_version == 2
    assert {k: v for k, v in configs(repo).items() if k in second} == second
    assert [e["outcome"] for e in history(repo)] == ["deployed", "deployed", "rolled_back", "rolled_back"]


def test_a_file_that_fails_its_golden_check_is_removed_and_v1_stays_pinned(tmp_path, free_port):
    cfg, repo = production(free_port), tmp_path / "repo"
    deploy_offline(cfg, export_release(tmp_path / "e1", w=4.0, b=-2.0, threshold=0.4), repo)
    before = configs(repo)
    bad = export_release(tmp_path / "e2", w=-3.0, b=1.0, threshold=0.6, golden_shift=0.01)
    with pytest.raises(ServingError, match="golden check .* failed.*version 1 is still served"):
        deploy_offline(cfg, bad, repo)
    assert list_versions(repo, cfg.model_name) == [1] and configs(repo) == before
    assert history(repo)[-1]["outcome"] == "failed"


def test_deploying_the_served_production_model_again_changes_nothing(tmp_path, free_port):
    cfg, repo = production(free_port), tmp_path / "repo"
    release = export_release(tmp_path / "e1", w=4.0, b=-2.0, threshold=0.4)
    deploy_offline(cfg, release, repo)
    again = deploy_offline(cfg, release, repo)
    assert again.unchanged and again.version == 1 and list_versions(repo, cfg.model_name) == [1]
    # the same model under the embedded flavour is a change: written as version 2 with model.py
    embedded = deploy_offline(ServingConfig(grpc_port=cfg.grpc_port), release, repo)
    assert embedded.version == 2 and (repo / cfg.model_name / "2" / "model.py").is_file()
    assert parse(repo / cfg.model_name / "config.pbtxt").backend == "python"


def test_medops_deploy_exits_unavailable_then_deploys_with_no_verify(tmp_path, free_port, repo_root,
                                                                     capsys):
    from medops.cli import main
    from medops.config import update_params_file

    project = tmp_path / "project"
    release = export_release(project / "models", w=4.0, b=-2.0, threshold=0.4)
    (project / "reports").mkdir()
    release["gate"].rename(project / "reports" / "gate.json")
    (project / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    update_params_file(project / "params.yaml", {"serving": {
        "flavor": "production", "repository": str(tmp_path / "repo"), "grpc_port": free_port()}})
    assert main(["--project", str(project), "deploy"]) == ExitCode.UNAVAILABLE
    assert "--no-verify" in capsys.readouterr().err
    assert main(["--project", str(project), "deploy", "--no-verify", "--by", "ops"]) == 0
    assert capsys.readouterr().out == ("deployed pneumonia_classifier version 1 (data version "
                                       "dv-prod, production flavour); no server checked it "
                                       "(--no-verify): a server loads it when it starts\n")
    assert main(["--project", str(project), "rollback", "--no-verify"]) != 0  # nothing older
    assert served_version(tmp_path / "repo", "pneumonia_classifier") == 1
