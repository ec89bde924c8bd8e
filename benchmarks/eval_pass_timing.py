"""What an evaluation pass or an epoch costs after its last batch: a new distributed
iterator per pass (what the training loop did before `pixelcnn.passes`) against one
`passes.Passes` for all of them.

    python benchmarks/eval_pass_timing.py [--rounds 4]

The OOD benchmark's 28x28 model on the embedded MNIST split, batches of 32, float32.
Each round runs, for both ways, alternating: an evaluation pass over the 16 test batches
and a short "epoch" of 8 training steps (the first 8 training batches). Printed per
pass: its seconds, and the seconds between its last batch and the pass's end (the wait
for the iterator's deletion, which `pixelcnn.passes` explains).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from pixelcnn import data  # noqa: E402
from pixelcnn.likelihood import to_unit_range  # noqa: E402
from pixelcnn.model import PixelCNNPP  # noqa: E402
from pixelcnn.training import passes  # noqa: E402
from pixelcnn.training.trainer import Trainer, TrainerOptions  # noqa: E402


def model_fn(dtype):
    return PixelCNNPP((28, 28, 1), residual_blocks=3, residual_layers_per_block=1, filters=32,
                      num_mixtures=5, dropout_rate=0.0, dtype=dtype)  # fmt: skip


def timed(pass_batches, step) -> tuple[float, float]:
    """(seconds of the pass, seconds after its last batch was done)."""
    began = time.monotonic()
    last = began
    for batch in pass_batches():
        float(step(batch)[0])
        last = time.monotonic()
    end = time.monotonic()
    return end - began, end - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    options = TrainerOptions(learning_rate=2e-3, learning_rate_decay=0.99995)
    trainer = Trainer(strategy, model_fn, options)
    train, test = data.embedded_mnist(32)
    trainer.initialize(to_unit_range(next(iter(train))[0], 8))
    splits = {
        "eval": (test, lambda b: trainer.eval_steps["ema"](b)),
        "epoch": (train.take(8), trainer.train_step),
    }
    for name, (ds, step) in splits.items():
        ds = ds.map(lambda x, y: {"images": to_unit_range(x, 8)})
        fresh = lambda ds=ds: iter(strategy.experimental_distribute_dataset(ds))  # noqa: E731
        kept = passes.Passes(strategy, ds)
        trainer.trace_for(**{("eval_spec" if name == "eval" else "train_spec"): kept.element_spec})
        splits[name] = (fresh, kept.next_pass, step)
    waits = {}
    for round_ in range(args.rounds):
        for name, (fresh, kept, step) in splits.items():
            for way, batches in (("new iterator", fresh), ("passes.Passes", kept)):
                total, after = timed(batches, step)
                waits.setdefault((name, way), []).append(after)
                print(f"round {round_} {name:5} {way:13}: pass {total:6.2f} s, "
                      f"{after:5.2f} s after its last batch", flush=True)  # fmt: skip
    for (name, way), w in waits.items():
        print(f"{name:5} {way:13}: after the last batch, total {sum(w):.1f} s over "
              f"{len(w)} passes, most {max(w):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
