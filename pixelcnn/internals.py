"""Every use of an internal of TensorFlow, gin or CPython, each where no public API
serves.

Nothing else in the package imports ``tensorflow.python`` or ``tensorflow.compiler``,
touches an underscore attribute of TensorFlow, Keras or gin, relies on a name one of
them makes up, or uses ``ctypes``. Each function says why the internal is needed;
``tests/test_internals.py`` fails with a clear message when a release moves one of them.
"""

from __future__ import annotations

import ctypes
import inspect
import os

import tensorflow as tf


def dynamic_update_slice(buf: tf.Tensor, value: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """``buf`` with ``value`` written at offset ``start`` ([rank] int32), in place
    inside an XLA-compiled loop.

    The cached sampler's buffers are updated at every pixel; XLA's DynamicUpdateSlice
    does it in place, where a scatter (``tf.tensor_scatter_nd_update``) or a
    ``tf.concat`` of slices copies the buffer. ``tf.raw_ops`` does not export
    XlaDynamicUpdateSlice; tf2xla's Python wrapper is the only way to emit it.
    """
    from tensorflow.compiler.tf2xla.python import xla

    return xla.dynamic_update_slice(buf, value, start)


def op_determinism_enabled() -> bool:
    """Whether ``tf.config.experimental.enable_op_determinism()`` is in effect.

    TensorFlow exports the setter only; the getter lives in its config module. The
    codec records it, because a decode on another setting may pick other kernels.
    """
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def stop_termination_watcher(handler) -> None:
    """Stops the thread of a ``tf.distribute.experimental.PreemptionCheckpointHandler``
    that watches the cluster for a termination notice.

    It must stop while every worker is still up (else it fails, with a traceback, once
    the chief has exited); TensorFlow stops it only in the handler's ``__del__``, which
    that thread's own reference to the handler keeps from running.
    """
    handler._stop_cluster_wise_termination_watcher_thread()


def call_gin_reference(reference, *args):
    """Calls the configurable a gin binding refers to (``gin.query_parameter`` of
    ``train.dataset_fn = @mnist`` gives a reference to ``mnist``) with its own bindings.

    gin offers no public way to call a queried reference; its undocumented
    ``scoped_configurable_fn`` is the configurable with the reference's scope applied.
    """
    return reference.scoped_configurable_fn(*args)


def keep_constructor_signature(cls) -> None:
    """Gives a gin-configurable Keras class's ``__init__`` its real signature back.

    ``gin.configurable`` wraps ``__init__`` as ``(*args, **kwargs)``, and Keras reads the
    constructor's signature to record its config (``.keras`` saving).
    """
    cls.__init__.__signature__ = inspect.signature(cls.__init__.__wrapped__)


def preemption_scratch_dir(checkpoint_dir: str, task_id: int) -> str:
    """The folder a ``tf.distribute.experimental.PreemptionCheckpointHandler`` given
    ``checkpoint_dir`` creates on non-chief worker ``task_id`` (beside it), which it
    deletes itself only after a preemption.

    No public API names it; TensorFlow's failure_handling module makes the name up
    (``workertemp_<task>``). Calling that function also creates the folder, as the
    handler does when it starts.
    """
    from tensorflow.python.distribute.failure_handling import failure_handling

    return os.path.dirname(failure_handling._non_chief_checkpoint_dir(checkpoint_dir, task_id))


def keep_forever(obj) -> None:
    """Adds a reference to ``obj`` that is never given back, so it is never deleted
    (it goes when the process exits, which does not run its destructor).

    Deleting a tf.data iterator whose pipeline autotunes waits, in TensorFlow 2.21, for
    its autotuning thread's next timed wake-up, up to a minute
    (``pixelcnn.training.passes``); tf.distribute's iterators autotune whatever the
    dataset's options say, and TensorFlow offers no way to stop that thread. Keeping
    the iterator costs its threads and buffers: ``Passes`` keeps one iterator per split,
    so a ``train`` call keeps two (bounded by the number of calls in a process, one for
    the command line).
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


# glibc's own limits once its dynamic mmap threshold has adapted to large blocks (64-bit):
# blocks under 32 MiB come from the heap, and up to twice that stays free at its top.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def undo_malloc_trim_patch() -> bool:
    """Gives glibc's malloc back the large-block limits that TensorFlow's tf.data takes
    away; returns whether it could (False off glibc).

    Creating a ``GeneratorDataset``, which every tf.distribute iterator does (through a
    ``MultiDeviceIterator``), makes TensorFlow 2.21 call ``mallopt(M_TRIM_THRESHOLD,
    128 KiB)`` for the whole process. Setting any threshold turns off glibc's dynamic
    mmap threshold, so every block above 128 KiB, every activation of a training step,
    is mapped fresh and returned to the kernel when freed: each step faults its memory
    in again, page by page, and spends much of its time in the kernel
    (benchmarks/README.md, "Through the command line"). No TensorFlow option stops the
    patch, so after each iterator is made this sets both thresholds to where glibc's
    adaptation would have taken them.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD)
    )
