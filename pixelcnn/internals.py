"""Every use of an internal of TensorFlow, gin, CPython or the C library, each where no
public API serves.

Nothing else in the package imports ``tensorflow.python`` or ``tensorflow.compiler``,
touches an underscore attribute of TensorFlow, Keras or gin, relies on a name one of
them makes up, or uses ``ctypes``. Each function says why the internal is needed;
``tests/test_internals.py`` fails with a clear message when a release moves one of them.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import platform

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


# The ceiling of glibc's own adaptation of its thresholds (64-bit): blocks under 32 MiB come
# from the heap, and up to twice that stays free at its top.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def _glibc_mallopt():
    """glibc's ``mallopt``, or None under another C library (macOS, musl, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


_MALLOPT = _glibc_mallopt()


def undo_malloc_trim_patch() -> bool:
    """Gives glibc's malloc back large-block thresholds after TensorFlow's tf.data lowers
    them; returns whether it could (False under another C library).

    Creating a ``GeneratorDataset``, which every tf.distribute iterator does (through a
    ``MultiDeviceIterator``), makes TensorFlow 2.21 call ``mallopt(M_TRIM_THRESHOLD,
    128 KiB)`` for the whole process. Every ``free`` then hands the top of the heap back
    to the kernel, and setting a threshold also freezes glibc's dynamic mmap threshold
    where it stood (128 KiB if nothing larger was freed before), so large blocks are
    mapped fresh. Either way a training step's activations are faulted in again, page by
    page, every step (benchmarks/README.md, "Through the command line"). No TensorFlow
    option stops the patch, so after each iterator is made this sets both thresholds to
    the ceiling of glibc's own adaptation.
    """
    if _MALLOPT is None:
        return False
    mmap_set = _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = _MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set) and bool(trim_set)
