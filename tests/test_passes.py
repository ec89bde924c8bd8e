"""pixelcnn.passes: passes over data through one distributed iterator, against each
epoch's dataset iterated on its own."""

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn import passes


def _epoch_data(known: bool):
    base = tf.data.Dataset.range(10)
    if not known:  # a filter hides the length from tf.data
        base = base.filter(lambda x: x >= 0)

    def dataset_for(epoch):
        return base.map(lambda x: x + 100 * tf.cast(epoch, tf.int64)).batch(4)

    return dataset_for


def _values(batches) -> list[list[int]]:
    return [b.numpy().tolist() for b in batches]


@pytest.mark.parametrize("known", [True, False], ids=["known length", "unknown length"])
def test_passes_are_the_epochs_and_an_abandoned_pass_is_skipped(known):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    dataset_for = _epoch_data(known)
    p = passes.Passes(strategy, dataset_for, first=2, skip=1)
    assert p.batches == (3 if known else None)
    assert _values(p.next_pass()) == _values(dataset_for(2))[1:]  # resumed after a batch
    first = next(p.next_pass())  # epoch 3 abandoned after one batch
    assert first.numpy().tolist() == [300, 301, 302, 303]
    for epoch in (4, 5):
        assert _values(p.next_pass()) == _values(dataset_for(epoch))
    assert p.epoch == 6
    if known:  # every pass came from one iterator, which close() lets go undeleted
        kept = weakref.ref(p._iterator)
        p.close()
        gc.collect()
        assert kept() is not None


def test_an_infinite_dataset_is_one_pass():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    p = passes.Passes(strategy, lambda _: tf.data.Dataset.range(3).repeat().batch(2))
    assert p.batches is None
    batches = p.next_pass()
    got = [next(batches).numpy().tolist() for _ in range(4)]
    np.testing.assert_array_equal(got, [[0, 1], [2, 0], [1, 2], [0, 1]])


def test_a_skip_past_the_epochs_end_ends_that_epoch():
    """A resume with a larger batch: the saved step within the epoch is past its end."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    dataset_for = _epoch_data(True)
    p = passes.Passes(strategy, dataset_for, first=0, skip=7)
    assert _values(p.next_pass()) == []
    assert _values(p.next_pass()) == _values(dataset_for(1))
