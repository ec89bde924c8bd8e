"""When each batch of an evaluation pass finishes, against when the pass ends.

    python benchmarks/eval_pass_timing.py

Three rounds of an EMA and a raw pass of `Trainer.evaluate`'s loop over the embedded MNIST
test split (the OOD benchmark's 28x28 model, batches of 32): per pass, its total seconds and
the seconds at which each batch was done.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from pixelcnn import data  # noqa: E402
from pixelcnn.likelihood import to_unit_range  # noqa: E402
from pixelcnn.model import PixelCNNPP  # noqa: E402
from pixelcnn.trainer import Trainer  # noqa: E402


def model_fn(dtype):
    return PixelCNNPP((28, 28, 1), residual_blocks=3, residual_layers_per_block=1, filters=32,
                      num_mixtures=5, dropout_rate=0.0, dtype=dtype)  # fmt: skip


def main() -> None:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    trainer = Trainer(strategy, model_fn, 2e-3, 0.99995, 0.95, 0.9995, 0.9995, "float32")
    train, test = data.embedded_mnist(32)
    trainer.initialize(to_unit_range(next(iter(train))[0], 8))
    test = test.map(lambda x, y: {"images": to_unit_range(x, 8)})
    dist = strategy.experimental_distribute_dataset(test)
    trainer.trace_for(eval_spec=dist.element_spec)
    for round_ in range(3):
        for weights in ("ema", "raw"):
            began, done = time.monotonic(), []
            for batch in dist:
                float(trainer.eval_steps[weights](batch)[0])
                done.append(time.monotonic() - began)
            total = time.monotonic() - began
            print(f"round {round_} {weights}: pass {total:.2f} s, batches done at",
                  " ".join(f"{t:.2f}" for t in done), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
