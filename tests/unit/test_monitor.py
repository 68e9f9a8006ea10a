"""Drift monitoring on real data: the bundled PneumoniaMNIST as DICOM films and pydicom's own
files, recorded exactly as the DICOM ensemble's recorder does (medops.drift) with a small fixed
model (probability = sigmoid(w * mean + b)); the monitor fires on a shifted window and not on an
unshifted one; ``medops monitor --json`` and its exit codes; the log's rotation and size bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import pydicom_file
from medops.cli import main
from medops.config import MonitorConfig, PreprocessSpec
from medops.dicom.pixels import preprocess_bytes
from medops.drift import RequestLog, answer_record, item_features
from medops.errors import ExitCode, MonitorDataError
from medops.ops.monitor import Reference, category_test, compare, holm
from medops.paths import BUNDLED_DATASET

W, B = 6.0, -3.0


def film_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit MONOCHROME2 CR file of ``pixels`` (as a hospital's export would hold)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "CR", "CHEST", "Synthetic Imaging Co."
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [0.14, 0.14]
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def served_record(data: bytes) -> dict:
    """What the recorder logs for ``data``: the preprocessing model's features and the answer."""
    try:
        image, error = preprocess_bytes(data, PreprocessSpec(image_size=28)), ""
    except Exception as exc:  # noqa: BLE001 - as the ensemble: an error for this item
        image, error = np.zeros((28, 28), np.float32), f"decode_error: {exc}"
    p = 1 / (1 + math.exp(-(W * float(image.mean()) + B)))
    return answer_record(item_features(data, image, error), p)


@pytest.fixture(scope="module")
def bundled():
    with np.load(BUNDLED_DATASET) as npz:
        return {k: npz[k] for k in ("train_images", "val_images")}


@pytest.fixture(scope="module")
def reference(bundled):
    """Features of 600 train films; answers on the first 300 val films."""
    rng = np.random.default_rng(0)
    train = bundled["train_images"][rng.choice(len(bundled["train_images"]), 600, replace=False)]
    features = [served_record(film_bytes(x)) for x in train]
    probs = [served_record(film_bytes(x))["probability"] for x in bundled["val_images"][:300]]
    return Reference(features, {"probability": probs, "ood_score": None})


@pytest.fixture(scope="module")
def unshifted(bundled):
    """200 val films the reference's answers did not use."""
    return [served_record(film_bytes(x)) for x in bundled["val_images"][300:500]]


CFG = MonitorConfig(window=200)


def test_an_unshifted_window_does_not_fire(reference, unshifted):
    result = compare(reference, unshifted, CFG)
    assert not result.drift, result.summary()
    assert result.n == 200 and result.n_errors == 0
    names = {t.name for t in result.tests}
    assert {"ks:probability", "chi2:modality", "chi2:spacing", "ks:mean", "ks:p95"} <= names
    assert "ks:ood_score" not in names  # no detector: nothing to test


def test_inverted_films_in_a_fifth_of_the_window_fire_the_image_and_output_tests(
    reference, unshifted, bundled
):
    inverted = [served_record(film_bytes(255 - x)) for x in bundled["val_images"][:40]]
    result = compare(reference, unshifted[:160] + inverted, CFG)
    assert result.drift, result.summary()
    fired = {t.name for t in result.fired}
    assert fired & {"ks:mean", "ks:p50", "ks:p05", "ks:p25", "ks:p75", "ks:p95", "ks:std"}
    assert not fired & {"chi2:modality", "chi2:manufacturer"}  # same headers
    assert all(t.p_adjusted < CFG.alpha for t in result.fired)


def test_foreign_images_fire_the_header_tests(reference, unshifted):
    ct = served_record(pydicom_file("CT_small.dcm").read_bytes())
    mr = served_record(pydicom_file("MR_small.dcm").read_bytes())
    assert (ct["modality"], mr["modality"]) == ("CT", "MR") and not ct["error"]
    result = compare(reference, unshifted[:160] + [ct, mr] * 20, CFG)
    fired = {t.name: t for t in result.fired}
    assert result.drift and "chi2:modality" in fired
    assert "CT 0% -> 10%" in fired["chi2:modality"].detail or "MR 0% -> 10%" in fired["chi2:modality"].detail


def test_one_stray_image_is_not_a_drifting_population(reference, unshifted):
    """Against a large reference (6000 films, as the reference stage's 5000), the chi-square
    is significant for two CTs in 200; the total-variation floor (5%) keeps it quiet."""
    ct = served_record(pydicom_file("CT_small.dcm").read_bytes())
    large = Reference(reference.features * 10, reference.outputs)
    result = compare(large, unshifted[:198] + [ct, ct], CFG)
    modality = next(t for t in result.tests if t.name == "chi2:modality")
    assert modality.p_adjusted < CFG.alpha and not modality.fired


def test_too_few_answers_is_a_clear_error(reference, unshifted):
    with pytest.raises(MonitorDataError, match="10 usable recorded answers"):
        compare(reference, unshifted[:10], CFG)


def test_holm_and_the_category_test_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    stat, p, tvd = category_test(["CR"] * 90 + ["DX"] * 10, ["CR"] * 50 + ["DX"] * 50)
    assert tvd == pytest.approx(0.4) and p < 1e-6
    assert category_test(["CR"] * 5, ["CR"] * 3) == (0.0, 1.0, 0.0)


def test_the_log_rotates_and_reads_back_the_last_records(tmp_path):
    log = RequestLog(tmp_path, max_bytes=200, keep=2)
    for i in range(30):
        log.append([{"i": i, "probability": 0.5}])
    files = log.files()
    assert len(files) == 3 and all(p.stat().st_size <= 200 + 40 for p in files)
    last = log.read_last(5)
    assert [r["i"] for r in last] == [25, 26, 27, 28, 29]
    kept = [r["i"] for r in log.read_last()]
    assert kept == list(range(kept[0], 30)) and kept[0] > 0  # the oldest were dropped
    with open(log.path, "ab") as f:
        f.write(b'{"i": 30, "probab')  # a write cut short by a crash
    assert log.read_last(1)[0]["i"] == 29


@pytest.fixture
def project(tmp_path, repo_root, reference):
    import shutil

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "reference.json").write_text(json.dumps(
        {"features": reference.features, "outputs": reference.outputs}))
    return tmp_path


def run_monitor(capsys, project, *argv):
    code = main(["--project", str(project), "monitor", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_medops_monitor_json_and_exit_codes(project, unshifted, bundled, capsys):
    log = RequestLog(project / ".medops" / "drift")  # serving.record_dir, in the state folder
    code, out = run_monitor(capsys, project)
    assert code == ExitCode.BAD_INPUT and "usable recorded answers" in out["error"]["message"]
    log.append(unshifted)
    code, out = run_monitor(capsys, project)
    assert code == ExitCode.OK and out["drift"] is False and out["n"] == 200
    assert {"name", "statistic", "p_value", "fired"} <= set(out["tests"][0])
    log.append([served_record(film_bytes(255 - x)) for x in bundled["val_images"][:60]])
    code, out = run_monitor(capsys, project, "--window", "200")
    assert code == ExitCode.FAILURE and out["drift"] is True and out["n"] == 200
    assert any(t["fired"] for t in out["tests"])
