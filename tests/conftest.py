"""Test setup: quiet TensorFlow, and two logical CPU devices for the mirrored tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialised by an earlier import; keep what is there
    pass


# The test files that take longest (test_benchmarks' single long test early, as it cannot
# be split); the rest follow in their usual order.
# With --dist loadfile and --no-loadscope-reorder (pyproject.toml) the two workers take
# files in this order, each as it runs low, so the short files fill in at the end.
LONGEST_FIRST = (
    "test_train.py",
    "test_benchmarks.py",
    "test_precision.py",
    "test_cli.py",
    "test_faults.py",
    "test_sampling.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


@pytest.fixture
def clean_gin():
    """No gin bindings before or after the test."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def tiny_gin():
    """The tiny model's gin bindings (``helpers.bind_tiny``), cleared after the test."""
    import gin
    from helpers import bind_tiny

    gin.clear_config()
    bind_tiny()
    yield
    gin.clear_config()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
