"""A model trained on shuffled labels is never deployed (issue 5, item 6).

Real PneumoniaMNIST images; only the TRAIN labels are permuted, so the model can learn nothing
that holds on the (true-labelled) test split. The champion is the same recipe trained on the true
labels, exported to ONNX and placed in an embedded Triton repository as the served version. The
gate runs with params.yaml's gate section (absolute thresholds and the champion comparison), and
deploy's own gate check must refuse the result.

A control run sends the true-label model through the same evaluate + gate and sees it pass, so
the test fails if the recipe is too weak to tell the two apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _ingested import build_ingested
from medops import results
from medops.stages import evaluate as evaluate_stage
from medops.stages import export as export_stage
from medops.stages import gate
from medops.stages import split as split_stage
from medops.stages import train as train_stage
from medops.config import load_params
from medops.errors import GateRejectedError
from medops.paths import find_project_root
from medops.serving.contract import build_contract
from medops.serving.deploy import check_gate
from medops.serving.repository import served_version, write_version

pytestmark = pytest.mark.slow


def shuffle_train_labels(split_csv, out, *, seed: int = 7) -> float:
    """Write a copy of split.csv whose train labels are a seeded permutation of themselves
    (class balance kept); returns the share of train labels left unchanged."""
    table = pd.read_csv(split_csv, dtype={"sop_instance_uid": str, "patient_id": str, "split": str})
    train = (table["split"] == "train").to_numpy()
    true = table.loc[train, "label"].to_numpy()
    table.loc[train, "label"] = np.random.default_rng(seed).permutation(true)
    table.to_csv(out, index=False)
    return float((table.loc[train, "label"].to_numpy() == true).mean())


def train_and_evaluate(params, root, name, *, ingested, split_csv):
    """Train with params.yaml's train section (shortened: 8 epochs of a smaller simple_cnn),
    evaluate with its evaluate section; returns the folder and the EvaluateResult."""
    out = root / name
    train_cfg = params.train.model_copy(update={"epochs": 8, "batch_size": 32, "filters": [16, 32, 64],
                                                 "dense_units": 64})
    train_stage.run(train_cfg, params.augment, ingested_dir=ingested, split=split_csv,
                    model_out=out / "model.keras", result_out=out / "train.json", data_version="test-data")
    result = evaluate_stage.run(params.evaluate, model=out / "model.keras", ingested_dir=ingested,
                                split=split_csv, metrics_out=out / "metrics.json", plots_dir=out / "plots",
                                train_result=out / "train.json")
    return out, result


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Data, split, and the champion: the recipe on the true labels, evaluated, exported and
    written into an embedded Triton repository as the served version 1."""
    root = tmp_path_factory.mktemp("shuffled")
    params = load_params(find_project_root() / "params.yaml")
    ingested = build_ingested(root / "ingested", n_per_split={"train": 600, "val": 160, "test": 300})
    split_csv = root / "split.csv"
    split_stage.run(params.split, metadata=ingested / "metadata.parquet", out=split_csv)
    champ_dir, champ_eval = train_and_evaluate(params, root, "champion", ingested=ingested, split_csv=split_csv)
    export_stage.run(params.export, model=champ_dir / "model.keras", ingested_dir=ingested, split=split_csv,
                     train_result=champ_dir / "train.json", onnx_out=champ_dir / "model.onnx",
                     result_out=champ_dir / "export.json")
    repository = root / "repository"
    contract = build_contract(params.serving, image_size=params.ingest.image_size)
    write_version(contract, repository, champ_dir / "model.onnx")
    assert served_version(repository, contract.name) == 1

    def run_gate(model_dir, out):
        return gate.run(params.gate, metrics=model_dir / "metrics.json", train_result=model_dir / "train.json",
                        out=out, predictions=model_dir / "plots" / "predictions.csv",
                        ingested_dir=ingested, split=split_csv, repository=repository, model_name=contract.name)

    return {"root": root, "params": params, "ingested": ingested, "split": split_csv, "champion": champ_dir,
            "champion_eval": champ_eval, "run_gate": run_gate}


def test_control_the_true_label_recipe_passes_the_same_gate(served, tmp_path):
    """Without this, the shuffled-label test could pass only because the recipe is too weak."""
    assert served["params"].gate.compare_with_serving  # the shipped settings are what is under test
    control = served["run_gate"](served["champion"], tmp_path / "gate.json")
    assert control.passed, control.reasons
    assert control.champion.compared and control.champion.version == 1
    # the champion scored in onnxruntime by the gate matches the Keras evaluation of the same model
    assert control.champion.auc == pytest.approx(served["champion_eval"].auc, abs=1e-4)
    assert abs(control.champion.difference) < 1e-4
    assert check_gate(tmp_path / "gate.json") == "test-data"


# Seed 7 is the hard case, kept on purpose: on this data a model trained on shuffled labels can
# still reach a test AUC near 0.88 (it learns the image's dominant brightness/texture feature,
# which separates the classes by itself, with a sign that chance and the val-AUC epoch selection
# pick), above min_auc 0.85, so only the champion comparison stops it. Seed 8 lands near 0.5.
# seed 7 (stopped by the champion comparison) runs in make test, seed 8 (stopped by min_auc,
# a branch test_gate covers) in make test-long
@pytest.mark.parametrize("seed", [7, pytest.param(8, marks=pytest.mark.long)])
def test_a_model_trained_on_shuffled_labels_is_never_deployed(served, tmp_path, seed):
    params = served["params"]
    shuffled_csv = tmp_path / "split_shuffled.csv"
    assert shuffle_train_labels(served["split"], shuffled_csv, seed=seed) < 0.7  # really shuffled
    cand_dir, cand_eval = train_and_evaluate(params, tmp_path, "shuffled", ingested=served["ingested"],
                                             split_csv=shuffled_csv)
    decision = served["run_gate"](cand_dir, tmp_path / "gate.json")
    failed = [r for r in decision.reasons if r.endswith(": fail")]
    assert not decision.passed and failed

    # the side-by-side comparison with the champion fails, on the same test rows
    champ = decision.champion
    assert champ.compared and not champ.passed and champ.version == 1
    assert champ.candidate_auc == pytest.approx(cand_eval.auc, abs=1e-4)
    assert champ.auc == pytest.approx(served["champion_eval"].auc, abs=1e-4)
    assert champ.reason in failed and "worse by" in champ.reason
    # the absolute thresholds judged the same numbers evaluate wrote
    auc_ok = cand_eval.auc >= params.gate.min_auc
    assert (f"auc {cand_eval.auc:.3f} {'>=' if auc_ok else '<'} min_auc {params.gate.min_auc:.3f}: "
            f"{'pass' if auc_ok else 'fail'}") in decision.reasons

    # and deploy's gate check refuses it, naming every failed check
    for refuse in (check_gate, results.require_passed):
        with pytest.raises(GateRejectedError, match="gate rejected the model") as info:
            refuse(tmp_path / "gate.json")
        assert all(r in str(info.value) for r in failed)
    print(f"seed {seed}: candidate auc {cand_eval.auc:.3f}, champion auc {champ.auc:.3f}; failed: {failed}")
