"""Epochs and evaluation passes over a dataset through one distributed iterator.

Deleting a tf.data iterator whose pipeline autotunes waits, in TensorFlow 2.21, for
its autotuning thread's next timed wake-up: the deletion does not wake it. That
thread's period doubles from 10 ms to a minute, and tf.distribute's iterators autotune
whatever the dataset's options say. A new iterator every epoch or evaluation pass
would stall each by up to as long again (a minute at most). A ``Passes`` keeps one
iterator for all its passes instead: the data repeated (or, when it changes every
epoch, every epoch's data chained), and the known number of batches taken per pass
(``benchmarks/eval_pass_timing.py`` compares the two). Data whose length tf.data cannot
tell (``cardinality`` unknown, e.g. after a ``filter``) gets an iterator per pass;
``tf.data.experimental.assert_cardinality`` declares one.

For the same reason ``close`` never deletes the iterator: it is kept until the process
exits, which does not delete it either (``internals.keep_forever``). A ``train`` call
keeps two (its splits'), with their prefetched batches and, for a shuffled split, the
shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import tensorflow as tf

from pixelcnn import internals


class Passes:
    """Passes over ``dataset`` for epochs ``first``, ``first + 1``, ..., distributed over
    ``strategy``; the first pass starts after its first ``skip`` batches (a resumed
    epoch).

    per_epoch: optional (dataset, epoch) -> that epoch's batches, for data that changes
      every epoch (a background model's mutation); epoch is a Python int, or an int64
      scalar tensor in the chained pipeline. Every epoch must have as many batches as
      the first: tf.data raises if one has not.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        dataset: tf.data.Dataset,
        first: int = 0,
        skip: int = 0,
        per_epoch: Callable[[tf.data.Dataset, int | tf.Tensor], tf.data.Dataset] | None = None,
    ):
        self.strategy, self.per_epoch = strategy, per_epoch or (lambda ds, _: ds)
        self.base, self.epoch, self.skip = dataset, int(first), int(skip)
        count = int(self.per_epoch(dataset, self.epoch).cardinality())
        # Known and finite: one iterator. Unknown (-2), infinite (-1) or empty: one
        # per pass, which also lets an infinite dataset run as one long pass.
        self.batches = count if count > 0 else None
        self._iterator, self._left = None, 0
        if self.batches is None:
            self._dataset = self._pass_dataset()
        else:
            self.skip = min(self.skip, self.batches)  # a resume with a larger batch
            chained = dataset.repeat() if per_epoch is None else self._chained()
            self._dataset = strategy.experimental_distribute_dataset(chained.skip(self.skip))
        self.element_spec = self._dataset.element_spec  # what the steps are traced for

    def _chained(self) -> tf.data.Dataset:
        """Every epoch's data from ``first`` on, as one dataset with ``base``'s options.
        File-based sharding cannot see the files inside flat_map's function, so an
        explicit FILE policy becomes DATA (every worker reads every file)."""
        same_length = tf.data.experimental.assert_cardinality(self.batches)
        chained = tf.data.Dataset.range(self.epoch, 2**62).flat_map(
            lambda epoch: self.per_epoch(self.base, epoch).apply(same_length)
        )
        options = self.base.options()
        chained = chained.with_options(options)
        policy = tf.data.experimental.AutoShardPolicy
        if options.experimental_distribute.auto_shard_policy == policy.FILE:
            by_data = tf.data.Options()
            by_data.experimental_distribute.auto_shard_policy = policy.DATA
            chained = chained.with_options(by_data)  # the later options win
        return chained

    def _pass_dataset(self):
        batches = self.per_epoch(self.base, self.epoch).skip(self.skip)
        return self.strategy.experimental_distribute_dataset(batches)

    def next_pass(self) -> Iterator:
        """The distributed batches of the next pass. What an abandoned pass left is
        skipped first, so every pass starts at its epoch's first batch."""
        if self.batches is None:
            dataset, self._dataset = self._dataset, None
            batches = iterate(dataset if dataset is not None else self._pass_dataset())
        else:
            if self._iterator is None:
                self._iterator = iterate(self._dataset)
            for _ in range(self._left):
                next(self._iterator)
            self._left = self.batches - self.skip
            batches = self._take()
        self.skip = 0
        self.epoch += 1
        return batches

    def _take(self):
        while self._left > 0:
            batch = next(self._iterator)
            self._left -= 1
            yield batch

    def close(self) -> None:
        """Lets go of the iterator without deleting it: it stays, with its threads and
        buffers, until the process exits (an extra reference that is never given back),
        because deleting it can wait up to a minute (the module's doc)."""
        if self._iterator is not None:
            internals.keep_forever(self._iterator)
        self._iterator = self._dataset = None


def iterate(dataset) -> Iterator:
    """An iterator over a distributed dataset (or any iterable), with malloc's thresholds
    given back afterwards: making a distributed iterator lowers them for the whole
    process (``internals.undo_malloc_trim_patch``)."""
    iterator = iter(dataset)
    internals.undo_malloc_trim_patch()
    return iterator
