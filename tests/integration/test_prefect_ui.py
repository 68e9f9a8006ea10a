"""The Prefect UI in a real browser, as a user starts a training run from it.

A copy of the project (what a clone holds) with a small synthetic export, ingested and versioned
with ``medops ingest`` and ``medops version-data``; a real ``prefect server start`` launched by
medops (medops.ops.prefect_server) on a free port with its home in the project's ``.medops/``;
both deployments served by ``python -m flows.serve``, as ``make demo`` does. Headless Chromium then
enters the UI at ``/`` (the server answers deep links with 404; the UI routes itself), opens the
training deployment, edits ``epochs`` in the custom-run form, submits, follows the run and waits
for it to complete. The run's page goes to ``reports/ui/prefect-training-run.png`` (or
``$MEDOPS_SCREENSHOT_DIR``).

The run is small (300 images, one epoch) and the gate is set so it cannot pass, so the flow
completes without deploying and needs no Triton. Skipped, saying how to install it, without
Chromium and chromedriver (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _chromium import chromium
from _project import REPO, clone_project

pytestmark = [pytest.mark.browser, pytest.mark.prefect, pytest.mark.dvc, pytest.mark.slow, pytest.mark.long]

RUN_TIMEOUT_S = 600   # one epoch on 100 images and the other stages: about 50 s on 2 idle cores
EPOCHS_IN_PARAMS = 2  # params.yaml's value; the form asks for 1
FINAL_STATES = ("Completed", "Failed", "Crashed", "Cancelled")


@pytest.fixture(scope="module")
def project(tmp_path_factory, free_port):
    from medops.config import load_params
    from medops.ops.demo import ensure_export
    from medops.paths import ProjectPaths

    root = clone_project(tmp_path_factory.mktemp("ui-project"), {
        "synth": {"max_images_per_split": 100},
        "train": {"epochs": EPOCHS_IN_PARAMS, "batch_size": 16},
        "evaluate": {"bootstrap_samples": 50, "gradcam_samples": 2},
        # a gate no model passes: the run completes without deploying (no Triton needed)
        "gate": {"min_auc": 1.0, "min_accuracy": 1.0, "compare_with_serving": False},
        "prefect": {"port": free_port(), "deployment_name": "medops-ui-test", "train_on_new_data": False},
    })
    params = load_params(root / "params.yaml")
    paths = ProjectPaths(root)
    assert ensure_export(paths, params)
    env = {**os.environ, "MEDOPS_DEID_KEY": "ui-test-key",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in (["ingest"], ["version-data"]):
        done = subprocess.run([sys.executable, "-m", "medops", "--project", str(root), *command],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return paths, params


@pytest.fixture(scope="module")
def served(project, tmp_path_factory):
    """The Prefect server and ``python -m flows.serve``, as ``make demo`` starts them."""
    from medops.ops.demo import _service_env
    from medops.ops.prefect_server import start_prefect, stop_prefect

    paths, params = project
    log_path = tmp_path_factory.mktemp("ui-logs") / "flow-serve.log"
    proc = None
    try:
        start_prefect(params.prefect, state_dir=paths.state)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=paths.root,
                                    env=_service_env(paths, params), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deployment = _wait_for_deployment(params.prefect.api_url, params.prefect.deployment_name, proc)
        assert deployment is not None, log_path.read_text(errors="replace")[-3000:]
        yield params.prefect, deployment, log_path
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        stop_prefect(paths.state)


def _wait_for_deployment(api_url: str, name: str, proc: subprocess.Popen) -> dict | None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        resp = httpx.get(f"{api_url}/deployments/name/training-pipeline/{name}", timeout=5)
        if resp.status_code == 200:
            return resp.json()
        time.sleep(1)
    return None


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def _click_button(driver, text: str, wait) -> None:
    """Click the (first visible) button or menu item whose text is ``text``."""
    xpath = (f"//button[normalize-space(.)='{text}'] | "
             f"//*[@role='menuitem'][normalize-space(.)='{text}'] | //a[normalize-space(.)='{text}']")
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(ec.element_to_be_clickable(("xpath", xpath))).click()


def _edit_int_parameter(driver, wait, name: str, value: int) -> None:
    """In the custom-run form: switch parameter ``name`` from None to int and type ``value``."""
    from selenium.webdriver.support import expected_conditions as ec

    field = wait.until(ec.presence_of_element_located((
        "xpath", f"//label[starts-with(normalize-space(.), '{name} ')]"
                 "/ancestor::*[.//button[normalize-space(.)='int']][1]")))
    field.find_element("xpath", ".//button[normalize-space(.)='int']").click()
    box = wait.until(lambda _: field.find_elements("css selector", "input[type=number]"))[0]
    box.send_keys(str(value))
    assert box.get_attribute("value") == str(value)


def _run_page_state(driver, run_name: str) -> str | None:
    """The state badge in the header of run ``run_name``'s page (None until that page shows: right
    after a client-side navigation the previous page, with badges of its own, is still drawn)."""
    main = driver.find_element("tag name", "main")
    if not main.text.startswith(f"Runs\n{run_name}\n"):
        return None
    badges = main.find_elements("xpath", ".//span[@data-slot='badge'][contains(@class, 'bg-state-')]")
    return badges[0].text.strip() if badges else None


def test_a_training_run_started_from_the_ui_form_completes(project, served, browser) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    from medops.config import load_params

    paths, _ = project
    cfg, deployment, serve_log = served
    wait = WebDriverWait(browser, 60)

    # enter at "/" as a user does (Prefect 3.8's server answers a deep link such as /deployments
    # with 404; the UI routes itself from there)
    browser.get(f"{cfg.ui_url}/")
    _click_button(browser, "Deployments", wait)
    try:
        link = wait.until(lambda d: d.find_elements("css selector", f"a[href$='/deployment/{deployment['id']}']"))
    except TimeoutException:
        raise AssertionError(  # e.g. "Unable to connect to Prefect server": see /ui-settings' api_url
            f"the training deployment is not listed; the page says "
            f"{browser.find_element('tag name', 'body').text[:400]!r}") from None
    link[0].click()
    wait.until(lambda d: "training-pipeline" in d.find_element("tag name", "main").text)
    _click_button(browser, "Run", wait)
    _click_button(browser, "Custom run", wait)
    _edit_int_parameter(browser, wait, "epochs", 1)
    _click_button(browser, "Submit", wait)
    _click_button(browser, "View run", wait)  # the toast that says the run is scheduled
    wait.until(lambda d: "/runs/flow-run/" in d.current_url)
    run_id = browser.current_url.split("/runs/flow-run/")[1].split("?")[0]
    name = httpx.get(f"{cfg.api_url}/flow_runs/{run_id}", timeout=10).json()["name"]

    # the page follows the run by itself (Scheduled, Pending, Running, ...): wait for a final state
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        state = _run_page_state(browser, name)
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state in FINAL_STATES:
            break
        time.sleep(1)
    run = httpx.get(f"{cfg.api_url}/flow_runs/{run_id}", timeout=10).json()
    assert seen and seen[-1] == "Completed", (seen, run["state"], serve_log.read_text(errors="replace")[-3000:])
    assert "Running" in seen  # the page showed the run in flight, then its end
    # open the run again from the runs list (client-side): the page as a user finds it afterwards,
    # every task run drawn
    tasks = httpx.post(f"{cfg.api_url}/task_runs/count",
                       json={"flow_runs": {"id": {"any_": [run_id]}}}, timeout=10).json()
    _click_button(browser, "Runs", wait)
    wait.until(lambda d: d.find_elements("css selector", f"main a[href*='/runs/flow-run/{run_id}']"))[0].click()
    wait.until(lambda d: _run_page_state(d, name) == "Completed"
               and f"{tasks} Task runs" in d.find_element("tag name", "main").text)
    screenshot_dir = Path(os.environ.get("MEDOPS_SCREENSHOT_DIR", REPO / "reports" / "ui"))
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(screenshot_dir / "prefect-training-run.png"))

    # the run is the form's: this deployment, epochs edited, every other parameter left empty
    assert run["deployment_id"] == deployment["id"] and run["state_type"] == "COMPLETED"
    assert run["parameters"]["epochs"] == 1
    assert run["parameters"]["project_root"] == str(paths.root)
    assert all(run["parameters"][k] is None for k in ("batch_size", "learning_rate", "min_auc"))
    # ... and it reached the pipeline: params.yaml and the train stage saw one epoch, not two
    assert load_params(paths.params).train.epochs == 1
    train = json.loads(paths.stage_result("train").read_text())
    assert train["epochs_run"] == 1
    gate = json.loads(paths.gate.read_text())
    assert gate["passed"] is False  # as set up: nothing deployed
    logs = httpx.post(f"{cfg.api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}},
                                                       "sort": "TIMESTAMP_ASC", "limit": 200},
                      timeout=10).json()
    assert any("params.yaml updated: {'train': {'epochs': 1}}" in rec["message"] for rec in logs)
