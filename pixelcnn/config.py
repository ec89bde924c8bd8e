"""Gin configuration: config files and bindings parsed strictly, and a run's datasets
rebuilt from the config it recorded (``run_dir/config.gin``)."""

from __future__ import annotations

import functools
import os
import sys

import gin

from pixelcnn import internals, rundir


class ConfigError(ValueError):
    """A config file or binding that does not parse (unknown or misspelt name, syntax,
    a module that does not import); ``__cause__`` is gin's or Python's error."""


@functools.cache
def _prepare_gin() -> None:
    """Once per process: registers every gin configurable, so bindings to them parse,
    and a reader of config files at the URLs TensorFlow's filesystems read (a run
    directory in a gs:// bucket holds its config.gin; gin tries its own reader of
    local files first). Done on the first parse, not on import."""
    import tensorflow as tf

    import pixelcnn.data  # noqa: F401
    import pixelcnn.data.tfds  # noqa: F401
    import pixelcnn.model  # noqa: F401
    import pixelcnn.training.train  # noqa: F401

    gin.config.register_file_reader(tf.io.gfile.GFile, tf.io.gfile.exists)


def parse(configs, bindings) -> None:
    """Parses config files then bindings strictly (unknown names are errors), from a
    clean gin state: what an earlier parse bound in this process is forgotten, so two
    runs' configs never mix.

    FileNotFoundError for a missing config file, ConfigError for anything gin rejects.
    """
    _prepare_gin()
    import tensorflow as tf

    # `import my_data` in a config or binding finds a module in the working directory
    # also through the console script (python main.py puts only its own folder first).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for path in configs:
        if not (os.path.isfile(path) or ("://" in path and tf.io.gfile.exists(path))):
            raise FileNotFoundError(f"config file {path} does not exist")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(list(configs), list(bindings))
    except (ValueError, ImportError, SyntaxError) as e:
        raise ConfigError(f"bad gin config: {e}") from e


def run_datasets(run_dir: str, batch_size: int, configs=(), bindings=()):
    """The run's (train, test) datasets, rebuilt from run_dir/config.gin (then
    ``configs`` and ``bindings``). ValueError saying what to do when they cannot be."""
    path = rundir.config_path(run_dir)
    try:
        parse((path, *configs), bindings)
    except ConfigError as e:
        if isinstance(e.__cause__, ImportError):
            raise ValueError(
                f"cannot rebuild the run's dataset from {path}: {e.__cause__}. The module that "
                "defines the run's train.dataset_fn must be importable (run from the folder "
                "that holds it, or add it to PYTHONPATH), or pass the images with --npz FILE "
                "or --folder DIR"
            ) from e
        raise
    try:
        dataset_fn = gin.query_parameter("train.dataset_fn")
        return internals.call_gin_reference(dataset_fn, batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"cannot rebuild the run's dataset: {e}") from e
