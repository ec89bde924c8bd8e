"""Export a trained model as a TensorFlow SavedModel that loads without this package.

    pixelcnn --log-dir RUN export OUT_DIR          (or pixelcnn.export(RUN, OUT_DIR))

OUT_DIR/
  1/            the SavedModel (TF Serving's base-path layout: version 1)
  model.json    the run's architecture
  README.txt    the signatures, the checkpoint, the run's last test bits/dim

Signatures (``tf.saved_model.load(OUT_DIR + "/1").signatures[name]``, keyword inputs):

  log_prob(images int32 [N, H, W, C] [, labels int32 [N]])
      -> log_prob float32 [N] (nats), bits_per_dim float32 [N]
  params(images [, labels]) -> params float32 [N, H, W, P] (raw mixture parameters)
  sample(num_images int32 [], seed int32 [2] [, labels int32 [num_images]])
      -> images int32 [num_images, H, W, C]

``labels`` exists only for a class-conditional model. ``sample`` is the cached sampler
(XLA) in batches of the exported ``sample_batch_size``, so it gives the same integers as
``pixelcnn.sample_fast(model, N, seed=(seed[0], seed[1]), batch_size=...)`` and as
``pixelcnn sample --seed S`` for seed [0, S], with the same batch size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import tensorflow as tf

from pixelcnn import checks, files, likelihood, rundir
from pixelcnn.inference import sampling
from pixelcnn.model import PixelCNNPP

__all__ = ["export"]


class _Serving(tf.Module):
    """The model's variables and the three serving functions."""

    def __init__(self, model: PixelCNNPP, sample_batch_size: int):
        super().__init__(name="pixelcnn")
        # The Keras model stays untracked (Keras would add its own signature for its
        # call); its variables, which the functions capture, are tracked here.
        self._get_model = lambda: model
        self.vars = [v.value if hasattr(v, "value") else v for v in model.weights]
        self.batch = sample_batch_size
        h, w, c = model.image_shape
        images = tf.TensorSpec([None, h, w, c], tf.int32, name="images")
        labels = tf.TensorSpec([None], tf.int32, name="labels")
        count = tf.TensorSpec([], tf.int32, name="num_images")
        seed = tf.TensorSpec([2], tf.int32, name="seed")
        conditional = model.num_classes is not None
        with_labels = (images, labels) if conditional else (images,)
        self.log_prob = tf.function(
            self._log_prob if conditional else lambda x: self._log_prob(x, None),
            input_signature=with_labels,
            autograph=False,
        )
        self.params = tf.function(
            self._params if conditional else lambda x: self._params(x, None),
            input_signature=with_labels,
            autograph=False,
        )
        self.sample = tf.function(
            self._sample if conditional else lambda n, s: self._sample(n, s, None),
            input_signature=(count, seed, labels) if conditional else (count, seed),
            autograph=False,
        )

    @property
    def model(self) -> PixelCNNPP:
        return self._get_model()

    # ------------------------------------------------------------------ checks
    def _checked_labels(self, labels, n):
        """labels with assertions: [n] and in [0, num_classes) (not an all-zero one-hot)."""
        k = self.model.num_classes
        if k is None:
            return None
        rule = checks.labels_rule(k)
        asserts = [
            tf.debugging.assert_equal(
                tf.shape(labels)[0], n, message="labels must hold one label per image"
            ),
            tf.debugging.assert_greater_equal(labels, 0, message=rule),
            tf.debugging.assert_less(labels, k, message=rule),
        ]
        with tf.control_dependencies(asserts):
            return tf.identity(labels)

    def _checked_images(self, images):
        bits = self.model.num_bits
        rule = checks.levels_rule(bits)
        asserts = [
            tf.debugging.assert_greater_equal(images, 0, message=rule),
            tf.debugging.assert_less(images, 2**bits, message=rule),
        ]
        with tf.control_dependencies(asserts):
            return tf.identity(images)

    # ------------------------------------------------------------------ signatures
    def _params(self, images, labels):
        images = self._checked_images(images)
        labels = self._checked_labels(labels, tf.shape(images)[0])
        x = likelihood.to_unit_range(images, self.model.num_bits)
        return {"params": self.model(x, labels, training=False)}

    def _log_prob(self, images, labels):
        images = self._checked_images(images)
        labels = self._checked_labels(labels, tf.shape(images)[0])
        x = likelihood.to_unit_range(images, self.model.num_bits)
        params = self.model(x, labels, training=False)
        lp = likelihood.mixture_log_prob(x, params, self.model.num_bits, validate=False)
        return {"log_prob": lp, "bits_per_dim": likelihood.bits_per_dim(lp, self.model.image_shape)}

    def _sample(self, num_images, seed, labels):
        """sample_fast's computation with a run-time N: the same noise and the same
        batches (``sampling.batch_layout``), run one after the other by ``tf.map_fn``."""
        model, b = self.model, self.batch
        h, w, c = model.image_shape
        asserts = [tf.debugging.assert_positive(num_images, message="num_images must be >= 1")]
        with tf.control_dependencies(asserts):
            n = tf.identity(num_images)
        labels = self._checked_labels(labels, n)
        mix_u, logistic_u = likelihood.sampling_noise(
            tf.stack([n, h, w]), c, model.num_mixtures, tf.cast(seed, tf.int64)
        )
        fill = sampling.FILL
        elems = [
            sampling.batch_layout(mix_u, b, fill.mix_u),
            sampling.batch_layout(logistic_u, b, fill.logistic_u),
        ]
        if labels is not None:
            elems.append(sampling.batch_layout(labels, b, fill.labels))
        generate = sampling.compiled(model, "fast_xla")
        known = tf.fill([b, h, w, c], tf.constant(fill.known, tf.float32))  # nothing known
        mask = tf.fill([b, h, w], fill.mask)

        def one_batch(args):
            y = args[2] if labels is not None else None
            return generate(y, args[0], args[1], known, mask)

        out = tf.map_fn(one_batch, elems, fn_output_signature=tf.TensorSpec([b, h, w, c], tf.int32))
        return {"images": tf.reshape(out, [-1, h, w, c])[:n]}


def _readme(model, source: str, checkpoint: str, metrics: dict | None, batch: int) -> str:
    h, w, c = model.image_shape
    labels = model.num_classes is not None
    lab = f", labels int32 [N] in [0, {model.num_classes})" if labels else ""
    slab = ", labels int32 [num_images]" if labels else ""
    last = "unknown (no metrics.json in the run directory)"
    if metrics and metrics.get("test_bits_per_dim") is not None:
        last = f"{metrics['test_bits_per_dim']:.4f} (step {metrics.get('step')})"
    return f"""PixelCNN++ SavedModel, exported by pixelcnn from {source}
checkpoint: {checkpoint}
run's last test bits/dim (EMA weights): {last}
images: {h}x{w}x{c}, {model.num_bits} bits per sub-pixel (integers in [0, {2**model.num_bits}))
class-conditional: {f"yes, {model.num_classes} classes" if labels else "no"}

Layout: 1/ is the SavedModel, version 1 of TensorFlow Serving's base-path layout
(tensorflow_model_server --model_base_path=<this folder>). model.json is the
architecture. Load it with TensorFlow alone (pixelcnn is not needed):

    m = tf.saved_model.load("<this folder>/1")
    out = m.signatures["log_prob"](images=tf.constant(x, tf.int32){", labels=..." if labels else ""})

Signatures (keyword inputs; outputs are a dict):
  log_prob: images int32 [N, {h}, {w}, {c}]{lab}
            -> log_prob float32 [N] (nats per image), bits_per_dim float32 [N]
  params:   the same inputs -> params float32 [N, {h}, {w}, {model.num_params}]: the raw
            discretised logistic mixture parameters, [logits (K) | means (C*K) |
            log_scales (C*K) | coeffs (C(C-1)/2*K)], K = {model.num_mixtures}
  sample:   num_images int32 [], seed int32 [2]{slab}
            -> images int32 [num_images, {h}, {w}, {c}], cached generation (XLA) in
            batches of {batch}; the same seed gives the same images, the same integers as
            `pixelcnn sample --seed S --batch-size {batch}` for seed [0, S].
N may be any batch size. Values out of range (pixels, labels) are errors.
"""


def _write(serving: _Serving, folder: str, summary: dict, readme: str) -> None:
    """The SavedModel (folder/1) with its three signatures, model.json, README.txt last."""
    tf.saved_model.save(
        serving,
        os.path.join(folder, "1"),
        signatures={
            "log_prob": serving.log_prob.get_concrete_function(),
            "params": serving.params.get_concrete_function(),
            "sample": serving.sample.get_concrete_function(),
        },
    )
    files.write_atomic(os.path.join(folder, "model.json"), json.dumps(summary, indent=2) + "\n")
    files.write_atomic(os.path.join(folder, "README.txt"), readme)


def export(
    source: str | os.PathLike | PixelCNNPP,
    out_dir: str | os.PathLike,
    checkpoint: str | None = None,
    use_ema: bool = True,
    sample_batch_size: int = sampling.BATCH_SIZE,
) -> str:
    """Writes the SavedModel export of a run (or of a built model) to ``out_dir``.

    Args:
      source: a run directory (its newest good checkpoint, or ``checkpoint``; EMA
        weights unless ``use_ema=False``) or a ``PixelCNNPP``.
      out_dir: the folder to create (it must not exist or be empty).
      sample_batch_size: images per compiled call of the ``sample`` signature.
    Returns:
      the SavedModel's path, out_dir/1.
    """
    out_dir = os.path.expanduser(os.fspath(out_dir))
    gfile = tf.io.gfile
    if gfile.exists(out_dir) and (not gfile.isdir(out_dir) or gfile.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder: pick a new one")
    batch = checks.check_positive_int(sample_batch_size, "sample_batch_size")
    metrics = None
    if isinstance(source, PixelCNNPP):
        model, where, ckpt = source, "a PixelCNNPP in memory", "none (weights in memory)"
        if not model.built:
            raise ValueError("the model has no weights yet: train or load it first")
    else:
        run_dir = os.fspath(source)
        model, ckpt = rundir.load_for_inference(run_dir, checkpoint, use_ema)
        where = f"{run_dir} ({'EMA' if use_ema else 'raw'} weights)"
        metrics = rundir.read_metrics(run_dir)
    serving = _Serving(model, batch)
    summary = model.config_summary() | {"sample_batch_size": batch, "checkpoint": str(ckpt)}
    readme = _readme(model, where, str(ckpt), metrics, batch)
    # A local export is written into a fresh folder beside out_dir, then renamed: a
    # failed export leaves neither a half-written out_dir nor the temporary folder.
    # Object stores (gs://) have no rename of folders: there it is written in place,
    # README.txt last, so a folder without README.txt is an export that did not finish.
    if "://" in out_dir:
        _write(serving, out_dir, summary, readme)
        return os.path.join(out_dir, "1")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        _write(serving, tmp, summary, readme)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out_dir, "1")
