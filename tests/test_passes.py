"""pixelcnn.training.passes: passes over data through one distributed iterator, against each
epoch's dataset iterated on its own."""

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn.training import passes


def _data(known: bool):
    """A dataset of 3 batches and a per-epoch change (epoch e adds 100 * e)."""
    base = tf.data.Dataset.range(10)
    if not known:  # a filter hides the length from tf.data
        base = base.filter(lambda x: x >= 0)

    def per_epoch(dataset, epoch):
        return dataset.map(lambda x: x + 100 * tf.cast(epoch, tf.int64)).batch(4)

    return base, per_epoch


def _values(batches) -> list[list[int]]:
    return [b.numpy().tolist() for b in batches]


@pytest.mark.parametrize("known", [True, False], ids=["known length", "unknown length"])
def test_passes_are_the_epochs_and_an_abandoned_pass_is_skipped(known):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    base, per_epoch = _data(known)
    p = passes.Passes(strategy, base, first=2, skip=1, per_epoch=per_epoch)
    assert p.batches == (3 if known else None)
    assert _values(p.next_pass()) == _values(per_epoch(base, 2))[1:]  # resumed after a batch
    first = next(p.next_pass())  # epoch 3 abandoned after one batch
    assert first.numpy().tolist() == [300, 301, 302, 303]
    for epoch in (4, 5):
        assert _values(p.next_pass()) == _values(per_epoch(base, epoch))
    assert p.epoch == 6
    if known:  # every pass came from one iterator, which close() lets go undeleted
        kept = weakref.ref(p._iterator)
        p.close()
        gc.collect()
        assert kept() is not None


def test_an_infinite_dataset_is_one_pass():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    p = passes.Passes(strategy, tf.data.Dataset.range(3).repeat().batch(2))
    assert p.batches is None
    batches = p.next_pass()
    got = [next(batches).numpy().tolist() for _ in range(4)]
    np.testing.assert_array_equal(got, [[0, 1], [2, 0], [1, 2], [0, 1]])


def test_a_skip_past_the_epochs_end_ends_that_epoch():
    """A resume with a larger batch: the saved step within the epoch is past its end."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    base, per_epoch = _data(True)
    p = passes.Passes(strategy, base, first=0, skip=7, per_epoch=per_epoch)
    assert _values(p.next_pass()) == []
    assert _values(p.next_pass()) == _values(per_epoch(base, 1))


def test_data_that_does_not_change_repeats_with_its_own_options():
    """Without a per-epoch change the data is repeated, so tf.data keeps the dataset's
    options and tf.distribute shards it as it would the dataset itself."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    options = tf.data.Options()
    options.deterministic = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    base = tf.data.Dataset.range(5).batch(2).with_options(options)
    p = passes.Passes(strategy, base, skip=1)
    assert [_values(p.next_pass()) for _ in range(2)] == [[[2, 3], [4]], [[0, 1], [2, 3], [4]]]
    chained = passes.Passes(strategy, base, per_epoch=lambda ds, _: ds)._chained()
    assert chained.options().deterministic is False  # flat_map alone would drop it
    policy = chained.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA  # files hidden in flat_map


def test_an_epoch_of_another_length_is_an_error():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    base = tf.data.Dataset.range(10).batch(1)
    p = passes.Passes(strategy, base, per_epoch=lambda ds, epoch: ds.take(2 - epoch))
    assert _values(p.next_pass()) == [[0], [1]]
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 2"):
        _values(p.next_pass())  # epoch 1 has one batch
