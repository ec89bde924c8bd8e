"""Lossless image compression with a trained model: ``encode`` / ``decode``.

Each sub-pixel is range coded (``constriction``'s first-in-first-out range coder) with
the model's distribution over its 2**b values: pixels in raster order, channels in
order, channel c's distribution conditioned on the channels before it as the likelihood
defines it (the mixture weights updated by the earlier channels' masses, the means
shifted by the coupling coefficients). So the coded size is the model's -log2 p of the
images plus the coder's overhead and the file's header.

Encoder and decoder run the same program: the cached generation loop of
``pixelcnn.inference.generation`` over batches of exactly ``batch_size`` images, the
last one filled up with zero images; at each pixel the network's output goes to one
Python function (``_PixelCoder``) that builds the probability tables, codes the known
values (encoder) or decodes them (decoder), and returns them as the pixel's value.

Format 2 (what ``encode`` writes) decodes exactly on any machine: the network and the
tables are integer arithmetic (``pixelcnn.inference.exact``: post-training quantisation
of the weights, tables of the nonlinearities), so the probabilities are a pure function
of the file and the weights, whatever the CPU, its instruction sets, oneDNN, the thread
count, the TensorFlow patch version or a GPU. A file needs the model's weights (the run
directory or its checkpoint) and this package.

Format 1 (earlier files) computed the tables from the float32 network: it decodes
exactly only on the software and hardware stack that wrote it (``STACK_FIELDS``, which
its header records; decoding elsewhere warns first). In both formats the SHA-256 of the
original pixels, stored in the file, decides whether a decode is right: wrong images
are never returned.

File format, little-endian:

    8 bytes   magic b"PCNNCODE"
    2 bytes   format version (uint16): 2 (1 for earlier files)
    4 bytes   header length L (uint32)
    L bytes   header: UTF-8 JSON (the fields ``encode`` writes), zlib-compressed
    4 W bytes the coded words (uint32) of every batch, batch after batch
    32 bytes  SHA-256 of everything before it

Nothing is pickled. Labels of a class-conditional model are stored in the header.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct
import warnings
import zlib

import numpy as np
import tensorflow as tf

from pixelcnn import checks, distribute, internals, likelihood
from pixelcnn.inference import exact, generation
from pixelcnn.model import weights_fingerprint

__all__ = ["BATCH_SIZE", "CodecError", "decode", "encode", "read_header", "weights_fingerprint"]

MAGIC = b"PCNNCODE"
VERSION = 2  # what encode writes: the exact entropy model
READS = (1, 2)  # 1: the float32 network's tables (decodes on the stack that wrote it)
BATCH_SIZE = 64  # images per coding batch unless chosen otherwise; the header records it
FLOOR = 1e-9  # format 1: added to every value's probability before normalising the table
_PREFIX = struct.Struct("<8sHI")


class CodecError(ValueError):
    """A file that cannot be decoded (damaged, another model, unknown version) or a
    decode that does not reproduce the stored checksum."""


# ----------------------------------------------------------------------------- tables
class _PixelTables:
    """Format 1: the model's distribution of one pixel's channels, one channel at a
    time, from the float32 network (format 2's is ``exact.PixelTables``).

    params: float32 [N, P] (the network's output at the pixel). ``table(c)`` gives
    channel c's probabilities over the 2**b values, float64 [N, 2**b], given the values
    of channels < c passed to ``observe`` before.
    """

    def __init__(self, params: np.ndarray, channels: int, mixtures: int, bits: int):
        p = params.astype(np.float64)
        c, k = channels, mixtures
        self.c, self.k, self.bits = c, k, bits
        parts = {
            name: p[:, start:stop].reshape(len(p), *shape)
            for name, start, stop, shape in likelihood.param_layout(c, k)
        }
        logits = parts["logits"]
        self.log_w = logits - logits.max(axis=1, keepdims=True)  # [N, K], unnormalised
        self.means = parts["means"]
        log_scales = np.maximum(parts["log_scales"], likelihood.MIN_LOG_SCALE)
        self.inv_scales = np.exp(-log_scales)
        self.coeffs = np.tanh(parts["coeffs"])
        top = 2**bits - 1
        self.upper_edges = (2.0 * np.arange(top) + 1.0) / top - 1.0  # the 2**b - 1 inner edges
        self.x = np.zeros((p.shape[0], c))  # the observed values, in [-1, 1]
        self._masses = None

    def table(self, ch: int) -> np.ndarray:
        mu = self.means[:, ch].copy()  # [N, K]
        for j in range(ch):
            mu += self.coeffs[:, likelihood.coeff_index(ch, j)] * self.x[:, j, None]
        z = self.inv_scales[:, ch, :, None] * (self.upper_edges - mu[..., None])  # [N, K, V-1]
        cdf = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        n, k = mu.shape
        cdf = np.concatenate([np.zeros((n, k, 1)), cdf, np.ones((n, k, 1))], axis=2)
        self._masses = np.maximum(np.diff(cdf, axis=2), 0.0)  # [N, K, V]
        w = np.exp(self.log_w - self.log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkv->nv", w, self._masses) + FLOOR

    def observe(self, ch: int, values: np.ndarray) -> None:
        """Channel ch took ``values`` (int [N]): update the weights and the coupling."""
        mass = self._masses[np.arange(len(values)), :, values]  # [N, K]
        self.log_w = self.log_w + np.log(np.maximum(mass, 1e-300))
        self.x[:, ch] = checks.to_unit(values, self.bits)


class _PixelCoder:
    """Codes (or decodes) one batch, one pixel at a time, called from inside the graph.

    ``values``: int [B, H, W, C] the batch (encoder) or zeros to fill in (decoder); only
    the first ``count`` images are coded, the rest are the batch's filler (zeros).
    """

    def __init__(self, model, values: np.ndarray, count: int, coder, version: int):
        import constriction

        self.values = values
        self.count = count
        self.coder = coder
        self.decoding = isinstance(coder, constriction.stream.queue.RangeDecoder)
        self.family = constriction.stream.model.Categorical(perfect=False)
        h, w, self.channels = model.image_shape
        self.hw = (h, w)
        self.mixtures = model.num_mixtures
        self.bits = model.num_bits
        self.tables = exact.PixelTables if version == 2 else _PixelTables

    def __call__(self, i, j, params):
        i, j = int(i), int(j)
        if i >= self.hw[0] or j >= self.hw[1]:  # a phantom position: nothing to code
            return np.full((len(params), self.channels), -1.0, np.float32)
        tables = self.tables(params, self.channels, self.mixtures, self.bits)
        pixel = self.values[:, i, j]  # [B, C] (a view)
        n = self.count
        for ch in range(self.channels):
            table = tables.table(ch)[:n]
            if self.decoding:
                pixel[:n, ch] = self.coder.decode(self.family, table)
            else:
                self.coder.encode(pixel[:n, ch].astype(np.int32), self.family, table)
            tables.observe(ch, pixel[:, ch])
        return checks.to_unit(pixel.astype(np.float32), self.bits).astype(np.float32)


class _CodingProgram:
    """The coding program for one model, format and batch size: the cached generation
    loop (plain TF graph; format 2's on integers, on the CPU) whose per-pixel choice is
    a ``_PixelCoder`` of the caller's.

    Each ``code`` call registers its coder under a token of its own and passes the token
    into the program, so calls from several threads share the compiled program and
    never each other's coder.
    """

    def __init__(self, model, batch_size: int, version: int):
        if version == 2:
            weights = model.programs.get("exact_weights", lambda: exact.IntegerWeights(model))
            plan = exact.ExactGeneration(model, weights)
        else:
            plan = generation.CachedGeneration(model, jit=False)
        # Integers are exact on any device; the CPU keeps a GPU's convolution algorithms
        # (some of which are not sums of products) out of it.
        self._device = "/cpu:0" if version == 2 else None
        channels = model.image_shape[2]
        self._coders = {}
        self._tokens = itertools.count()

        def emit_for(token):
            def emit(i, j, params):
                value = tf.numpy_function(
                    lambda t, i, j, p: self._coders[int(t)](i, j, p),
                    [token, i, j, params],
                    tf.float32,
                )
                return tf.ensure_shape(value, [batch_size, channels])

            return emit

        def run(labels, zero, token):
            return plan.run(labels, batch_size, emit_for(token), zero)

        self._fn = tf.function(run, autograph=False)

    def code(self, coder: _PixelCoder, labels) -> np.ndarray:
        """Runs the program with ``coder`` choosing every pixel; int32 [B, H, W, C]."""
        token = next(self._tokens)
        self._coders[token] = coder
        try:
            with tf.device(self._device) if self._device else contextlib.nullcontext():
                return self._fn(labels, tf.constant(0.0), tf.constant(token, tf.int64)).numpy()
        finally:
            del self._coders[token]


def _code_batches(model, values, labels, batch_size, coders, version: int):
    """Runs the program of a format over the batches of ``values``, one coder each."""
    program = model.programs.get(
        ("codec", version, batch_size), lambda: _CodingProgram(model, batch_size, version)
    )
    n = len(values)
    for b, coder in enumerate(coders):
        start = b * batch_size
        count = min(batch_size, n - start)
        batch = np.zeros((batch_size, *values.shape[1:]), np.int64)
        batch[:count] = values[start : start + count]
        y = None
        if labels is not None:
            y = np.zeros(batch_size, np.int32)
            y[:count] = labels[start : start + count]
            y = tf.constant(y)
        try:
            out = program.code(_PixelCoder(model, batch, count, coder, version), y)
        except tf.errors.OpError as e:  # raised by the coder inside the program
            raise CodecError(f"batch {b} cannot be coded: {e.message.strip()[:300]}") from e
        values[start : start + count] = batch[:count]
        if not np.array_equal(out[:count], batch[:count]):
            raise CodecError("the generation program did not reproduce the coded values")


# ----------------------------------------------------------------------------- format
def _pixels_fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images, "<i4").tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, "<i4").tobytes())
    return digest.hexdigest()


def _stack() -> dict:
    """The software and hardware a format-1 file's probabilities depend on (the header
    records it; format 2 records it too, for information only)."""
    from importlib.metadata import version

    return {
        "tensorflow": tf.__version__,
        "constriction": version("constriction"),
        "numpy": np.__version__,
        "device": distribute.device_description(),
        # CPU kernels may split a reduction differently with another thread count
        "threads": f"{os.cpu_count()} cores, intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}",
        "op_determinism": internals.op_determinism_enabled(),
    }


STACK_FIELDS = ("tensorflow", "constriction", "numpy", "device", "threads", "op_determinism")


def encode(
    model, images, labels=None, batch_size: int = BATCH_SIZE, weights: str | None = None
) -> bytes:
    """Losslessly compresses integer images with ``model``'s distribution.

    Args:
      model: a ``PixelCNNPP`` (e.g. ``load_for_inference``'s; float32).
      images: int [N, H, W, C] in [0, 2**bits) of the model's shape.
      labels: int [N] in [0, num_classes) for a class-conditional model, else None.
      batch_size: images per coding batch; the decoder uses the one in the header.
      weights: where the weights came from (run, checkpoint, EMA or raw), recorded in
        the header so that a decode with other weights can say which ones it needs.
    Returns:
      the file's bytes (format 2: module docstring), which ``decode`` reads back
      exactly on any machine with the same weights.
    """
    return _encode(model, images, labels, batch_size, weights, VERSION)


def _encode(model, images, labels, batch_size, weights, version: int) -> bytes:
    """``encode`` in a given format (1 only to test that earlier files still decode)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be int [N, H, W, C] with N >= 1, got shape {images.shape}")
    checks.check_integer_images(images, model.image_shape, model.num_bits, "images")
    batch_size = checks.check_positive_int(batch_size, "batch_size")
    n = len(images)
    labels = checks.model_labels(model.num_classes, labels, n)
    import constriction

    coders = [constriction.stream.queue.RangeEncoder() for _ in range(-(-n // batch_size))]
    values = images.astype(np.int64)
    _code_batches(model, values, labels, batch_size, coders, version)
    words = [c.get_compressed().astype("<u4") for c in coders]
    header = {
        "format": "pixelcnn-codec",
        "version": version,
        "image_shape": [int(d) for d in model.image_shape],
        "num_bits": int(model.num_bits),
        "count": n,
        "labels": None if labels is None else [int(y) for y in labels],
        "batch_size": batch_size,
        "batch_words": [len(w) for w in words],
        "weights": weights,
        "weights_sha256": weights_fingerprint(model),
        "pixels_sha256": _pixels_fingerprint(images, labels),
        "coder": "constriction RangeEncoder (queue), Categorical(perfect=False)",
        **({"entropy_model": exact.SETTINGS} if version == 2 else {"floor": FLOOR}),
        **_stack(),
    }
    text = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREFIX.pack(MAGIC, version, len(text)) + text + b"".join(w.tobytes() for w in words)
    return body + hashlib.sha256(body).digest()


_FIELDS = {
    "version": int, "image_shape": list, "num_bits": int, "count": int, "batch_size": int,
    "batch_words": list, "weights_sha256": str, "pixels_sha256": str,
}  # fmt: skip


def read_header(data: bytes) -> dict:
    """The header of a coded file, after checking its magic, SHA-256 and version."""
    if len(data) < _PREFIX.size + 32 or data[:8] != MAGIC:
        raise CodecError("not a pixelcnn compressed file (no PCNNCODE magic at its start)")
    _, version, length = _PREFIX.unpack_from(data)
    known = " or ".join(map(str, READS))
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        if version not in READS:
            raise CodecError(
                f"the file is damaged, or of a format version ({version}) this pixelcnn "
                f"does not know (it reads versions {known})"
            )
        raise CodecError("the file is damaged: its SHA-256 does not match (truncated or altered)")
    if version not in READS:
        raise CodecError(
            f"format version {version} is not known to this pixelcnn (it reads versions "
            f"{known}): decode with the pixelcnn version that wrote the file"
        )
    try:
        header = json.loads(zlib.decompress(data[_PREFIX.size : _PREFIX.size + length]))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"the file's header cannot be read: {e}") from e
    wrong = [k for k, kind in _FIELDS.items() if not isinstance(header.get(k), kind)]
    if wrong or header["count"] < 1 or header["batch_size"] < 1:
        raise CodecError(f"the file's header is incomplete or wrong (fields {wrong or 'count'})")
    batches = -(-header["count"] // header["batch_size"])
    labels = header.get("labels")
    if len(header["batch_words"]) != batches or (
        labels is not None and len(labels) != header["count"]
    ):
        raise CodecError("the file's header does not add up (batches or labels against count)")
    words = data[_PREFIX.size + length : -32]
    if len(words) != 4 * sum(header["batch_words"]):
        raise CodecError("the file's length does not match its header (truncated or altered)")
    if header["version"] != version:
        raise CodecError("the file's header and prefix name different format versions")
    header["_words_at"] = _PREFIX.size + length
    return header


def decode(model, data: bytes):
    """Decodes ``encode``'s bytes with the same model.

    Returns (images int32 [N, H, W, C], labels int32 [N] or None). CodecError for a
    damaged file, another model, an unknown version, or a decode that does not match
    the checksum of the original pixels (then nothing is returned). A format-2 file
    decodes on any machine; a format-1 file where it was written (elsewhere a warning
    comes first).
    """
    header = read_header(data)
    if header["weights_sha256"] != weights_fingerprint(model):
        source = f" ({header['weights']})" if header.get("weights") else ""
        raise CodecError(
            "the file was written with another model (its weights' SHA-256 differs): "
            f"decode with the run, checkpoint and weights that compressed it{source}"
        )
    shape = (*header["image_shape"],)
    if shape != tuple(model.image_shape) or header["num_bits"] != model.num_bits:
        raise CodecError(f"the file holds {shape} images of {header['num_bits']} bits")
    version = header["version"]
    if version == 2 and header.get("entropy_model") != exact.SETTINGS:
        raise CodecError(
            "the file's exact entropy model has other settings than this pixelcnn's: "
            "decode with the pixelcnn version that wrote it"
        )
    stack = _stack()
    changed = [k for k in STACK_FIELDS if header.get(k) != stack[k]]
    if version == 1 and changed:
        warnings.warn(
            "the file (format version 1) was written on another stack ("
            + "; ".join(f"{k}: {header.get(k)} there, {stack[k]} here" for k in changed)
            + "): its probabilities may differ here, and the decode may not verify",
            stacklevel=2,
        )
    import constriction

    try:
        labels = checks.model_labels(model.num_classes, header.get("labels"), header["count"])
    except ValueError as e:
        raise CodecError(f"the file's labels do not fit this model: {e}") from e
    at = header["_words_at"]
    coders = []
    for count in header["batch_words"]:
        words = np.frombuffer(data, "<u4", count, at).astype(np.uint32)
        coders.append(constriction.stream.queue.RangeDecoder(words))
        at += 4 * count
    n = header["count"]
    values = np.zeros((n, *shape), np.int64)
    _code_batches(model, values, labels, header["batch_size"], coders, version)
    images = values.astype(np.int32)
    if _pixels_fingerprint(images, labels) != header["pixels_sha256"]:
        why = (
            "a format-1 file's probabilities depend on the stack that wrote it: decode "
            "it there (files this pixelcnn writes, format 2, decode on any machine)"
            if version == 1
            else "the probabilities differed from the encoder's"
        )
        raise CodecError(
            f"the decoded pixels do not match the checksum of the originals: {why}; the "
            "decoded images are wrong and were not returned"
        )
    return images, labels
