from __future__ import annotations

import shutil

import pytest

from medops.config import Params, load_params, update_params_file
from medops.errors import ConfigError


def test_repo_params_validate(params):
    assert isinstance(params, Params)
    assert params.serving.host == "127.0.0.1"  # safe by default


def test_typo_in_params_fails_with_the_key(tmp_path, repo_root):
    p = tmp_path / "params.yaml"
    p.write_text((repo_root / "params.yaml").read_text().replace("epochs:", "epoch:"))
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_params(p)


def test_bad_value_fails(tmp_path, repo_root):
    p = tmp_path / "params.yaml"
    p.write_text((repo_root / "params.yaml").read_text().replace("learning_rate: 0.001", "learning_rate: -1"))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_params(p)


def test_update_params_file_keeps_comments_and_validates(tmp_path, repo_root):
    p = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", p)
    params = update_params_file(p, {"train": {"epochs": 2}, "gate": {"min_auc": 0.9}})
    assert params.train.epochs == 2 and params.gate.min_auc == 0.9
    text = p.read_text()
    assert "# medops pipeline settings" in text
    assert load_params(p).train.epochs == 2
    before = p.read_text()
    with pytest.raises(ConfigError):
        update_params_file(p, {"train": {"epochs": 0}})
    assert p.read_text() == before  # an invalid override never reaches the file
    with pytest.raises(ConfigError, match="unknown params section"):
        update_params_file(p, {"trian": {"epochs": 3}})


@pytest.mark.parametrize(("yaml_value", "key"), [
    ("filters: []", "train.filters"),
    ("filters: [16, 0, 32]", "train.filters.1"),
    ("model: resnet50", "train.model"),
])
def test_bad_train_architecture_fails_at_load(tmp_path, repo_root, yaml_value, key):
    p = tmp_path / "params.yaml"
    text = (repo_root / "params.yaml").read_text()
    field = yaml_value.split(":")[0]
    lines = [f"  {yaml_value}" if line.startswith(f"  {field}:") else line for line in text.splitlines()]
    assert lines != text.splitlines()
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_params(p)
    if field == "model":
        assert "choices: efficientnet_b0, resnet, simple_cnn, vit" in str(err.value)


def test_every_registered_model_is_a_valid_train_model_and_config_loads_no_tensorflow():
    import subprocess
    import sys

    from medops.config import TrainConfig
    from medops.models import MODELS

    assert all(TrainConfig(model=name).model == name for name in MODELS)
    code = "import sys, medops.config as c; c.TrainConfig(model='vit'); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_find_project_root_explicit_start_wins_over_medops_root(tmp_path, monkeypatch):
    from medops.paths import ProjectPaths, find_project_root

    given, env_root = tmp_path / "given", tmp_path / "env"
    for root in (given, env_root):
        (root / "sub").mkdir(parents=True)
        (root / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("MEDOPS_ROOT", str(env_root))
    monkeypatch.chdir(tmp_path)
    assert find_project_root(given / "sub") == given.resolve()
    assert ProjectPaths.discover(given).root == given.resolve()
    # no start: $MEDOPS_ROOT, then the current folder
    assert find_project_root() == env_root.resolve()
    monkeypatch.delenv("MEDOPS_ROOT")
    monkeypatch.chdir(given / "sub")
    assert find_project_root() == given.resolve()


def test_preferred_batch_size_above_max_batch_size_fails_at_load(tmp_path, repo_root):
    # Triton would refuse the model config: say so when params load, not as a deploy traceback
    p = tmp_path / "params.yaml"
    text = (repo_root / "params.yaml").read_text()
    assert "max_batch_size: 64" in text and "preferred_batch_sizes: []" in text
    p.write_text(text.replace("max_batch_size: 64", "max_batch_size: 32")
                 .replace("preferred_batch_sizes: []", "preferred_batch_sizes: [16, 64]"))
    with pytest.raises(ConfigError, match=r"preferred_batch_sizes \[64\] must lie in 1\.\.max_batch_size \(32\)"):
        load_params(p)


def test_preprocessing_spec_is_the_ingest_keys_of_params_yaml_as_one_value(tmp_path, repo_root):
    from medops.config import PreprocessSpec, Window

    text = (repo_root / "params.yaml").read_text()
    for old, new in (("image_size: 28 ", "image_size: 64 "), ("window: null ", "window: {center: 40, width: 400} "),
                     ("frame: middle ", "frame: max "), ("pixel_spacing: null ", "pixel_spacing: 0.7 ")):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "params.yaml").write_text(text)
    spec = load_params(tmp_path / "params.yaml").ingest.preprocessing
    assert spec == PreprocessSpec(image_size=64, window=Window(center=40, width=400), frame="max",
                                  pixel_spacing=0.7)
    with pytest.raises(AttributeError):
        spec.image_size = 32  # type: ignore[misc]  # frozen: one value, passed whole
    for bad, key in (({"image_size": 0}, "image_size"), ({"image_size": 8, "frame": "last"}, "frame"),
                     ({"image_size": 8, "pixel_spacing": 0.0}, "pixel_spacing")):
        with pytest.raises(ValueError, match=key):
            PreprocessSpec(**bad)
