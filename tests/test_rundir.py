"""pixelcnn.rundir: the run directory's files, read back as training wrote them, and
the errors of a directory that is not a run's. (Damaged checkpoints and the fallback
to the newest good one: tests/test_faults.py, which trains the runs it damages.)"""

import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import initialized_model

from pixelcnn import rundir
from pixelcnn.model import ModelConfig


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"evaluations": [1]}', '{"evaluations": [{"step": "2"}]}', '{"samples": [2]}'],
)
def test_a_damaged_metrics_json_is_reported(tmp_path, text):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(ValueError, match="metrics.json is not"):
        rundir.read_metrics(tmp_path)


def test_metrics_json_reads_back_and_a_run_without_one_has_none(tmp_path):
    assert rundir.read_metrics(tmp_path) is None
    metrics = {"evaluations": [{"step": 4, "test_bits_per_dim_ema": 5.2}], "samples": ["a.png"]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert rundir.read_metrics(tmp_path) == metrics
    assert rundir.metrics_path(tmp_path) == str(tmp_path / "metrics.json")


def test_config_files_and_the_architecture_read_back(tmp_path, clean_gin):
    model = initialized_model((4, 5, 2), bits=5, classes=3)
    rundir.write_config(str(tmp_path), model, "bfloat16")
    for name in ("config.gin", "operative_config.gin", "model.json"):
        assert (tmp_path / name).is_file()
    assert rundir.config_path(tmp_path) == str(tmp_path / "config.gin")
    config = rundir.model_config(str(tmp_path))
    assert config == model.config and isinstance(config, ModelConfig)
    assert json.loads((tmp_path / "model.json").read_text())["precision"] == "bfloat16"


def test_a_saved_model_loads_for_inference_with_its_weights(tmp_path, clean_gin):
    model = initialized_model((4, 5, 1))
    rundir.write_config(str(tmp_path), model, "float32")
    tf.train.Checkpoint(ema=model.checkpointable()).save(rundir.checkpoint_dir(tmp_path) + "/ckpt")
    loaded, path = rundir.load_for_inference(tmp_path)
    assert path.endswith("ckpt-1") and rundir.checkpoint_candidates(tmp_path) == [path]
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 1))
    np.testing.assert_allclose(loaded.log_prob(images), model.log_prob(images), rtol=1e-6)


def test_what_is_not_a_run_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rundir.load_for_inference(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="not a pixelcnn run directory"):
        rundir.load_for_inference(tmp_path)
    rundir.write_config(str(tmp_path), initialized_model((4, 5, 1)), "float32")
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
        rundir.load_for_inference(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        rundir.checkpoint_candidates(tmp_path, str(tmp_path / "ckpt-9"))


def test_new_run_directories_never_collide(tmp_path):
    first = rundir.new_run_dir(str(tmp_path))
    tf.io.gfile.makedirs(first)
    second = rundir.new_run_dir(str(tmp_path))
    assert first != second and not tf.io.gfile.exists(second)
