"""deploy/k8s/training (multi-worker training Job) and deploy/prefect (a Kubernetes work pool's
worker and base job template): every file loads, and the fields that matter agree with each other
and with medops (TF_CONFIG as medops.learn.distribute reads it, the DVC remote's credentials from a
Secret, every template variable declared). No cluster here: files only."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from medops.learn.distribute import parse_tf_config, plan_distribution

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(folder: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} in {folder}"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def training():
    return _docs(DEPLOY / "k8s" / "training")


@pytest.fixture(scope="module")
def container(training):
    [c] = training["Job"]["spec"]["template"]["spec"]["containers"]
    return c


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_job_runs_one_pod_per_worker_reachable_through_the_headless_service(training, container):
    job, svc = training["Job"]["spec"], training["Service"]
    workers = int(_env(container)["WORKERS"])
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == workers >= 2
    pod = job["template"]
    assert pod["spec"]["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = int(_env(container)["PORT"])
    assert [p["port"] for p in svc["spec"]["ports"]] == [port] == [p["containerPort"] for p in container["ports"]]
    assert pod["spec"]["restartPolicy"] == "Never" and job["backoffLimit"] == 0


@pytest.mark.parametrize("index", [0, 1])
def test_each_pod_gets_the_tf_config_medops_trains_multi_worker_with(training, container, index):
    script = container["args"][0]
    setup = script.split("dvc pull")[0]  # the lines that build TF_CONFIG, run as the pod runs them
    env = {"WORKERS": _env(container)["WORKERS"], "PORT": _env(container)["PORT"],
           "JOB_COMPLETION_INDEX": str(index), "PATH": "/usr/bin:/bin"}
    tf_config = subprocess.run(["/bin/bash", "-ec", setup + 'printf %s "$TF_CONFIG"'], env=env,
                               capture_output=True, text=True, check=True).stdout
    task = parse_tf_config(tf_config)
    name = training["Service"]["metadata"]["name"]
    assert task.cluster["worker"] == [f"{name}-{i}.{name}:2222" for i in range(2)]
    assert (task.task_type, task.task_index) == ("worker", index)
    # train.strategy auto (params.yaml) on such a pod: MultiWorkerMirroredStrategy, worker `index`
    plan = plan_distribution(strategy="auto", env={"TF_CONFIG": tf_config}, gpus=[])
    assert (plan.strategy, plan.worker_count, plan.worker_index) == ("multi_worker", 2, index)
    assert "dvc pull" in script and "medops stage train" in script


def test_the_dvc_remote_credentials_come_from_a_secret(container):
    env = _env(container)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == {"secretKeyRef": {"name": "medops-dvc-remote", "key": name}}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.fixture(scope="module")
def template():
    return json.loads((DEPLOY / "prefect" / "base-job-template.json").read_text())


def test_the_base_job_template_declares_every_variable_it_uses(template):
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    [c] = manifest["spec"]["template"]["spec"]["containers"]
    assert c["envFrom"] == [{"secretRef": {"name": "medops-dvc-remote"}}]
    assert c["image"] == "{{ image }}" and c["args"] == "{{ command }}"


def test_the_worker_polls_the_pool_and_may_create_jobs(template):
    docs = _docs(DEPLOY / "prefect")
    [c] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["prefect", "worker", "start"]
    assert c["args"][c["args"].index("--pool") + 1] == "medops-k8s"
    assert c["args"][c["args"].index("--type") + 1] == "kubernetes"
    assert "3.8.8" in c["image"]  # the Prefect version medops pins (pyproject.toml)
    account = docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    assert {"kind": "ServiceAccount", "name": account} == docs["RoleBinding"]["subjects"][0]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    [jobs] = [r for r in docs["Role"]["rules"] if "jobs" in r["resources"]]
    assert {"create", "delete", "watch"} <= set(jobs["verbs"]) and jobs["apiGroups"] == ["batch"]
    readme = (DEPLOY / "prefect" / "worker.yaml").read_text()
    assert "--base-job-template deploy/prefect/base-job-template.json" in readme
