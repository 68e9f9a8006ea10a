"""deploy/: the Dockerfile, docker-compose, Kubernetes manifests and Prometheus config load, and
agree with each other and with the embedded server (ports, health paths, repository, key header).
No Docker or cluster here: these check the files' key fields, not a running deployment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from medops.serving.server import ADMIN_HEADER, ADMIN_KEY_ENV

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def load_k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s():
    return load_k8s()


@pytest.fixture(scope="module")
def triton_container(k8s):
    [container] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_all_kinds_are_there(k8s):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
            "ConfigMap"} <= set(k8s)


def test_deployment_requests_a_gpu_and_probes_triton_health(triton_container):
    res = triton_container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in triton_container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton_container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton_container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton_container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_deployment_serves_the_repository_volume_with_a_restricted_model_api(k8s, triton_container):
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    args = triton_container["args"]
    assert "--model-repository=/models" in args and "--model-control-mode=explicit" in args
    assert f"--http-restricted-api=model-repository:{ADMIN_HEADER}=$({ADMIN_KEY_ENV})" in args
    assert f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}=$({ADMIN_KEY_ENV})" in args
    [env] = [e for e in triton_container["env"] if e["name"] == ADMIN_KEY_ENV]
    assert "secretKeyRef" in env["valueFrom"]  # the key comes from a Secret, never the manifest
    mounts = {m["name"]: m["mountPath"] for m in triton_container["volumeMounts"]}
    assert mounts["model-repository"] == "/models"
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes["model-repository"]["persistentVolumeClaim"]["claimName"]
    assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    [init] = spec["initContainers"]
    assert "cp -rn /opt/medops/model_repository/. /models/" in " ".join(init["command"])


def test_service_and_hpa_point_at_the_deployment(k8s):
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert {p["port"] for p in svc["ports"]} == {8000, 8001, 8002}
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": k8s["Deployment"]["metadata"]["name"]}
    assert hpa["minReplicas"] >= 1 and hpa["maxReplicas"] > hpa["minReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"])["rules"]
    exposed = {r["name"]["as"] for r in rules}
    assert metric["pods"]["metric"]["name"] in exposed  # the adapter defines what the HPA reads


def triton_metrics_used() -> set[str]:
    """Triton metric names the autoscaling rules query (checked against a live server elsewhere)."""
    text = (DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text()
    return set(re.findall(r"\bnv_[a-z_]+\b", text))


def test_autoscaling_reads_triton_queue_metrics():
    assert triton_metrics_used() == {"nv_inference_queue_duration_us", "nv_inference_request_success"}


def test_pods_are_scraped_on_the_metrics_port(k8s):
    ann = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002",
                   "prometheus.io/path": "/metrics"}


def test_prometheus_scrapes_triton_on_8002():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    static = jobs["triton"]
    assert static["metrics_path"] == "/metrics"
    assert static["static_configs"][0]["targets"] == ["triton:8002"]
    keep = jobs["triton-kubernetes"]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "true"


def test_compose_runs_the_image_with_a_gpu_volume_and_prometheus():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    triton = compose["services"]["triton"]
    context = (DEPLOY / triton["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / triton["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert {p.split(":")[0] for p in triton["ports"]} == {"8000", "8001", "8002"}
    [gpu] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "model-repository:/models" in triton["volumes"] and "model-repository" in compose["volumes"]
    assert any(a.startswith("--http-restricted-api=model-repository:") for a in triton["command"])
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


def test_dockerfile_builds_on_triton_with_medops_and_the_rendered_repository():
    text = (DEPLOY / "Dockerfile").read_text()
    image = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", image)
    assert "FROM ${TRITON_IMAGE}" in text
    assert "COPY deploy/model_repository /opt/medops/model_repository" in text
    assert "COPY medops ./medops" in text
    # the serving image pins numpy like the embedded Triton's environment does (the
    # Python-backend stub needs < 2), not like medops' own (NumPy 2)
    triton_env = (ROOT / "requirements-triton.in").read_text()
    numpy_spec = re.search(r"^numpy(>=\S+)$", triton_env, re.M).group(1)
    assert numpy_spec.endswith(",<2") and f'"numpy{numpy_spec}"' in text
    # medops deploy writes the classifier as a Python-backend model.py that imports onnxruntime
    ort_spec = re.search(r"^onnxruntime(>=\S+)$", triton_env, re.M).group(1)
    assert f'"onnxruntime{ort_spec}"' in text
    assert "/v2/health/ready" in text
    cmd = re.search(r"^CMD (\[.*?\])$", text, re.M | re.S).group(1)
    assert "--model-control-mode=explicit" in cmd and "--model-repository=/models" in cmd


# A fresh repository has no classifier version until the first `medops deploy`: with Triton's
# defaults (--exit-on-error=true, --strict-readiness=true) --load-model=* makes the server exit
# ("failed to load all models"), or never report ready, so it could never receive that deploy.
STARTUP_FLAGS = ("--load-model=*", "--exit-on-error=false", "--strict-readiness=false")


def dockerfile_cmd() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return json.loads(re.search(r"^CMD (\[.*?\])$", text, re.M | re.S).group(1).replace("\\\n", ""))


def startup_args() -> dict[str, list[str]]:
    """The tritonserver arguments of every way deploy/ starts it."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    [container] = load_k8s()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return {"Dockerfile": dockerfile_cmd(), "docker-compose": compose["services"]["triton"]["command"],
            "k8s": container["args"]}


@pytest.mark.parametrize("where", ["Dockerfile", "docker-compose", "k8s"])
def test_the_server_starts_and_is_ready_before_the_first_deploy(where):
    args = startup_args()[where]
    for flag in STARTUP_FLAGS:
        assert flag in args, f"{where} lacks {flag}"
    assert not {"--exit-on-error=true", "--strict-readiness=true"} & set(args)
    # the committed repository indeed has no classifier version: it is what deploy adds
    assert not [p for p in (DEPLOY / "model_repository" / "pneumonia_classifier").iterdir()
                if p.is_dir()]


def test_the_triton_release_matches_the_embedded_server():
    """Development runs tritonserver 2.51 from the nvidia-pytriton wheel (in the Triton
    environment, .venv-triton) = NGC release 24.10."""
    from medops.serving.server import triton_env

    assert triton_env().pytriton_version == "0.7.0"  # ships tritonserver 2.51.0 (NGC 24.10)
    assert "tritonserver:24.10-py3" in (DEPLOY / "Dockerfile").read_text()
