"""Lossless compression: exact round trips, coded length against the likelihood, and
every kind of bad file as one clear error."""

import hashlib
import struct

import numpy as np
import pytest
from helpers import initialized_model

from pixelcnn import distribute
from pixelcnn.inference import codec, sampling

BATCH = 4  # coding batch in these tests; the image counts below are not multiples of it


def model(shape, bits, classes=None, seed=0):
    return initialized_model(shape, bits, classes, seed)


def data(m, n, seed=1):
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if m.num_bits <= 8 else np.int32
    images = rng.integers(0, 2**m.num_bits, (n, *m.image_shape)).astype(dtype)
    labels = rng.integers(0, m.num_classes, n) if m.num_classes else None
    return images, labels


@pytest.mark.gpu  # also in benchmarks/gpu.py's run on a GPU
@pytest.mark.parametrize(
    "shape, bits, classes",
    [
        ((6, 5, 1), 8, None),
        ((4, 4, 2), 8, None),
        ((5, 4, 3), 5, None),
        ((3, 4, 1), 10, None),
        ((4, 5, 3), 8, 3),
    ],
    ids=["C1_b8", "C2_b8", "C3_b5", "C1_b10", "C3_b8_conditional"],
)
def test_round_trip_is_exact(shape, bits, classes):
    m = model(shape, bits, classes)
    images, labels = data(m, 7)
    blob = codec.encode(m, images, labels, batch_size=BATCH)
    out, out_labels = codec.decode(m, blob)
    np.testing.assert_array_equal(out, images)
    assert out.dtype == np.int32 and out.shape == images.shape
    if classes:
        np.testing.assert_array_equal(out_labels, labels)
        # the labels condition the probabilities: other labels, other coded words
        other = codec.encode(m, images, (labels + 1) % classes, batch_size=BATCH)
        words = [b[codec.read_header(b)["_words_at"] : -32] for b in (blob, other)]
        assert words[0] != words[1]
    else:
        assert out_labels is None
    header = codec.read_header(blob)
    assert header["batch_size"] == BATCH and len(header["batch_words"]) == 2


def test_coded_length_is_the_models_information_content():
    """On images the model itself drew (so no value sits in a tail the floor would cut),
    the payload is -log2 p from model.log_prob (the float network) plus at most the
    coder's flush per batch and 2% for the integer network and tables."""
    m = model((6, 6, 1), 8)
    images = sampling.sample_fast(m, 9, seed=(3, 1), batch_size=BATCH, jit_compile=False).numpy()
    ideal = -m.log_prob(images).numpy().astype(np.float64).sum() / np.log(2.0)
    header = codec.read_header(codec.encode(m, images, batch_size=BATCH))
    payload = 32 * sum(header["batch_words"])
    batches = len(header["batch_words"])
    assert 0.99 * ideal <= payload <= 1.02 * ideal + 64 * batches, (payload, ideal)


@pytest.fixture(scope="module")
def coded():
    m = model((6, 5, 1), 8)
    images, _ = data(m, 7)
    return m, images, codec.encode(m, images, batch_size=BATCH)


def _resealed(blob: bytes) -> bytes:
    """blob with its trailing SHA-256 recomputed (as if the damage were deliberate)."""
    body = blob[:-32]
    return body + hashlib.sha256(body).digest()


def test_damaged_files_are_clear_errors(coded):
    m, images, blob = coded
    with pytest.raises(codec.CodecError, match="damaged"):
        codec.decode(m, blob[:-100])
    flipped = bytearray(blob)
    flipped[len(blob) - 40] ^= 0x10  # a coded word
    with pytest.raises(codec.CodecError, match="damaged"):
        codec.decode(m, bytes(flipped))
    with pytest.raises(codec.CodecError, match="not a pixelcnn compressed file"):
        codec.decode(m, b"\x89PNG" + blob[4:])
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 8, 3)
    with pytest.raises(codec.CodecError, match=r"damaged, or of a format version \(3\)"):
        codec.decode(m, bytes(newer))
    with pytest.raises(codec.CodecError, match="format version 3 is not known"):
        codec.decode(m, _resealed(bytes(newer)))
    older = bytearray(blob)  # a format-2 body under a format-1 prefix
    struct.pack_into("<H", older, 8, 1)
    with pytest.raises(codec.CodecError, match="header and prefix name different"):
        codec.decode(m, _resealed(bytes(older)))


def test_a_decode_that_does_not_verify_is_never_returned(coded):
    m, images, blob = coded
    altered = bytearray(blob)
    altered[len(blob) - 40] ^= 0x10
    with pytest.raises(codec.CodecError, match="do not match the checksum"):
        codec.decode(m, _resealed(bytes(altered)))


def test_another_model_is_refused(coded):
    m, images, blob = coded
    other = model((6, 5, 1), 8, seed=1)
    with pytest.raises(codec.CodecError, match="another model"):
        codec.decode(other, blob)


def test_bad_inputs_are_clear_errors():
    m = model((6, 5, 1), 8)
    images, _ = data(m, 2)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(m, images[:, :5])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        codec.encode(m, images.astype(np.int32) + 255)
    with pytest.raises(ValueError, match="unconditional"):
        codec.encode(m, images, labels=[0, 1])
    cond = model((4, 5, 3), 8, 3)
    with pytest.raises(ValueError, match="class-conditional"):
        codec.encode(cond, data(cond, 2)[0])


def _with_header(blob: bytes, **fields) -> bytes:
    """blob with header fields replaced (and resealed)."""
    import json
    import zlib

    _, version, length = struct.unpack_from("<8sHI", blob)
    start = struct.calcsize("<8sHI")
    header = {**json.loads(zlib.decompress(blob[start : start + length])), **fields}
    text = zlib.compress(json.dumps(header).encode())
    body = struct.pack("<8sHI", b"PCNNCODE", version, len(text)) + text
    return _resealed(body + blob[start + length :])


def test_a_file_of_format_2_decodes_without_a_word_on_another_stack(coded):
    import warnings

    m, images, blob = coded
    assert codec.read_header(blob)["version"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = codec.decode(m, _with_header(blob, tensorflow="2.99.0", device="elsewhere"))
    np.testing.assert_array_equal(out, images)
    settings = {**codec.read_header(blob)["entropy_model"], "fraction_bits": 11}
    with pytest.raises(codec.CodecError, match="exact entropy model has other settings"):
        codec.decode(m, _with_header(blob, entropy_model=settings))


def test_a_file_of_format_1_still_decodes_where_it_was_written(coded):
    """Format 1 (the float32 network's tables) decodes on the stack that wrote it;
    from another stack a warning comes first (here the probabilities are the same, so
    the checksum then passes), and a decode that does not verify names the format."""
    m, images, _ = coded
    blob = codec._encode(m, images, None, BATCH, None, version=1)
    header = codec.read_header(blob)
    assert header["version"] == 1 and "floor" in header and "entropy_model" not in header
    np.testing.assert_array_equal(codec.decode(m, blob)[0], images)
    with pytest.warns(UserWarning, match="tensorflow: 2.99.0 there"):
        out, _ = codec.decode(m, _with_header(blob, tensorflow="2.99.0"))
    np.testing.assert_array_equal(out, images)
    altered = bytearray(blob)
    altered[len(blob) - 40] ^= 0x10
    with pytest.raises(codec.CodecError, match="a format-1 file's probabilities depend"):
        codec.decode(m, _resealed(bytes(altered)))


def test_the_recorded_device_tells_cpus_apart_by_their_kernels_instruction_sets():
    """Two CPUs that report the same model name ("AMD EPYC" in a virtual machine) but
    run different kernels (AVX2 or AVX-512) round differently: the header must tell
    them apart, so that decoding on the other warns first."""
    avx2 = distribute.device_description({"avx2", "fma", "sse4_2"})
    avx512 = distribute.device_description({"avx2", "fma", "avx512f", "avx512_bf16"})
    assert avx2 != avx512
    assert avx2.endswith("(avx2 fma)") and "avx512f avx512_bf16" in avx512
    assert distribute.device_description(set()).endswith("(no AVX2)")
    assert set(distribute.BF16_CPU_FLAGS) <= set(distribute.KERNEL_CPU_FLAGS)


def test_two_threads_code_with_one_model_at_once():
    """Encoding is re-entrant: each call codes with its own coder through the model's
    shared compiled program, so a service can compress two requests at once."""
    import threading

    m = model((6, 5, 1), 8)
    inputs = [data(m, 5, seed=s)[0] for s in (3, 4)]
    blobs, errors = [None, None], []
    barrier = threading.Barrier(2)

    def encode(k):
        try:
            barrier.wait()
            blobs[k] = codec.encode(m, inputs[k], None, batch_size=BATCH)
        except Exception as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=encode, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1):
        decoded, _ = codec.decode(m, blobs[k])
        np.testing.assert_array_equal(decoded, inputs[k])


# ------------------------------------------------------------------ other machines
# A process that decodes a file with other kernels than the encoder's: the stand-ins for
# another machine. The encoder (this process) runs with the defaults: oneDNN on, the
# CPU's best instruction set, every core, op determinism off.
_DECODE_ELSEWHERE = """
import os, sys
import numpy as np
import tensorflow as tf
variant, run, source, target = sys.argv[1:]
if variant == "one thread, one core":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
elif variant == "op determinism on":
    tf.config.experimental.enable_op_determinism()
import pixelcnn
from pixelcnn.inference import codec
model, _ = pixelcnn.load_for_inference(run)
with open(source, "rb") as f:
    images, labels = codec.decode(model, f.read())
np.savez(target, images=images, labels=labels)
"""
OTHER_STACKS = {
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "oneDNN SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "one thread, one core": {"OMP_NUM_THREADS": "1"},
    "op determinism on": {},
}


@pytest.fixture(scope="module")
def decoded_elsewhere(tmp_path_factory):
    """The legacy run's model encodes images here; one process per stand-in decodes
    them, all started at once (they wait on TensorFlow's import, mostly)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from pixelcnn import rundir

    tmp = tmp_path_factory.mktemp("elsewhere")
    run = tmp / "run"
    shutil.copytree(Path(__file__).resolve().parent / "data" / "legacy_run", run)
    m, _ = rundir.load_for_inference(run)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, *m.image_shape)).astype(np.int32)
    labels = rng.integers(0, 2, 6).astype(np.int32)
    source = tmp / "images.pcnn"
    source.write_bytes(codec.encode(m, images, labels, batch_size=BATCH))
    procs = {}
    for k, (name, env) in enumerate(OTHER_STACKS.items()):
        target = tmp / f"out{k}.npz"
        args = [sys.executable, "-c", _DECODE_ELSEWHERE, name, str(run), str(source), str(target)]
        proc = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        procs[name] = (proc, target)
    yield images, labels, procs
    for proc, _ in procs.values():
        proc.kill()


@pytest.mark.parametrize("stack", list(OTHER_STACKS))
def test_a_file_decodes_exactly_with_other_kernels(decoded_elsewhere, stack):
    images, labels, procs = decoded_elsewhere
    proc, target = procs[stack]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-3000:]
    with np.load(target) as f:
        np.testing.assert_array_equal(f["images"], images)
        np.testing.assert_array_equal(f["labels"], labels)
