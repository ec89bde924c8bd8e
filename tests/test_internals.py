"""pixelcnn.internals: each internal of TensorFlow or gin the package relies on still
exists and does what the package needs; no other module reaches into one."""

import inspect
import pathlib
import re
import subprocess
import sys

import gin
import numpy as np
import tensorflow as tf

from pixelcnn import PixelCNNPP, internals

PACKAGE = pathlib.Path(internals.__file__).parent


def test_no_other_module_imports_tensorflow_internals():
    private = re.compile(r"(from|import)\s+tensorflow\.(python|compiler)")
    offenders = [
        f"{path.name}:{i}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "internals.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not offenders, f"import TensorFlow internals only in internals.py: {offenders}"


def test_dynamic_update_slice_writes_in_place_under_xla():
    @tf.function(jit_compile=True, autograph=False)
    def put(buf, value, row, col):
        return internals.dynamic_update_slice(buf, value, tf.stack([0, row, col, 0]))

    buf = np.zeros([2, 4, 5, 3], np.float32)
    value = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    expected = buf.copy()
    expected[:, 1:3, 2:5] = value
    np.testing.assert_array_equal(put(buf, value, tf.constant(1), tf.constant(2)), expected)


def test_op_determinism_getter_follows_the_public_setter():
    code = (
        "import tensorflow as tf; from pixelcnn import internals; "
        "before = internals.op_determinism_enabled(); "
        "tf.config.experimental.enable_op_determinism(); "
        "print(before, internals.op_determinism_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


def test_preemption_handler_still_has_its_watcher_stop():
    handler = tf.distribute.experimental.PreemptionCheckpointHandler
    assert callable(getattr(handler, "_stop_cluster_wise_termination_watcher_thread", None)), (
        "TensorFlow moved PreemptionCheckpointHandler's watcher stop: update "
        "internals.stop_termination_watcher"
    )


def test_a_queried_gin_reference_calls_its_configurable_with_its_bindings():
    @gin.configurable("internals_test_fn")
    def fn(batch_size, scale=1):
        return batch_size * scale

    @gin.configurable("internals_test_user")
    def user(dataset_fn=None):
        return dataset_fn

    with gin.unlock_config():
        gin.parse_config(
            ["internals_test_fn.scale = 3", "internals_test_user.dataset_fn = @internals_test_fn"]
        )
    try:
        reference = gin.query_parameter("internals_test_user.dataset_fn")
        assert internals.call_gin_reference(reference, 5) == 15
    finally:
        gin.clear_config()


def test_the_configurable_model_keeps_its_constructor_signature():
    params = inspect.signature(PixelCNNPP.__init__).parameters
    assert "image_shape" in params and "num_bits" in params
    model = PixelCNNPP((3, 3, 1), residual_blocks=1, residual_layers_per_block=0, filters=4)
    assert PixelCNNPP.from_config(model.get_config()).config == model.config
