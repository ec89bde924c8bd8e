"""pixelcnn.config: strict parsing from a clean gin state, and a run's datasets rebuilt
from its own config.gin, also for several runs in one process."""

import gin
import numpy as np
import pytest

from pixelcnn import config


def _run_with_npz(folder, images, extra=""):
    """A run directory whose config.gin reads ``images`` from a .npz of its own."""
    folder.mkdir()
    path = folder / "images.npz"
    np.savez(path, images=images, labels=np.zeros(len(images), np.int32))
    (folder / "config.gin").write_text(
        f"train.dataset_fn = @npz\nnpz.path = '{path}'\nnpz.test_fraction = 0.25\n{extra}"
    )
    return folder


def _all_images(dataset) -> np.ndarray:
    return np.concatenate([np.asarray(images) for images, _ in dataset])


def test_two_runs_datasets_in_one_process_are_each_runs_own(tmp_path):
    """Parsing a second run's config starts from a clean gin state: nothing of the
    first run's bindings (its file, its seed) carries over, in either order."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 100, (8, 4, 4, 1)).astype(np.uint8)
    light = rng.integers(150, 256, (12, 4, 4, 1)).astype(np.uint8)
    first = _run_with_npz(tmp_path / "first", dark, "npz.seed = 3\n")
    second = _run_with_npz(tmp_path / "second", light)
    for run, images in ((first, dark), (second, light), (first, dark)):
        train, test = config.run_datasets(str(run), 4)
        got = np.concatenate([_all_images(train), _all_images(test)])
        assert sorted(got.ravel()) == sorted(images.ravel())
        if run is first:
            assert gin.query_parameter("npz.seed") == 3
        else:  # the second run never bound npz.seed: the first run's 3 is gone
            with pytest.raises(ValueError):
                gin.query_parameter("npz.seed")
    gin.clear_config()


def test_parse_forgets_earlier_bindings(tmp_path):
    config.parse((), ("train.batch_size = 7",))
    assert gin.query_parameter("train.batch_size") == 7
    config.parse((), ())
    with pytest.raises(ValueError):
        gin.query_parameter("train.batch_size")
    gin.clear_config()


def test_unknown_bindings_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="train.batch_sise"):
        config.parse((), ("train.batch_sise = 7",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.parse((str(tmp_path / "none.gin"),), ())
    gin.clear_config()
