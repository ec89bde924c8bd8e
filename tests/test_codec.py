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
    the payload is -log2 p from model.log_prob plus at most the coder's flush per batch
    and 1% for the fixed-point probabilities."""
    m = model((6, 6, 1), 8)
    images = sampling.sample_fast(m, 9, seed=(3, 1), batch_size=BATCH, jit_compile=False).numpy()
    ideal = -m.log_prob(images).numpy().astype(np.float64).sum() / np.log(2.0)
    header = codec.read_header(codec.encode(m, images, batch_size=BATCH))
    payload = 32 * sum(header["batch_words"])
    batches = len(header["batch_words"])
    assert ideal - 1 <= payload <= 1.01 * ideal + 64 * batches, (payload, ideal)


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
    struct.pack_into("<H", newer, 8, 2)
    with pytest.raises(codec.CodecError, match=r"damaged, or of a format version \(2\)"):
        codec.decode(m, bytes(newer))
    with pytest.raises(codec.CodecError, match="format version 2 is not known"):
        codec.decode(m, _resealed(bytes(newer)))


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


def test_another_stack_is_warned_about_before_decoding(coded):
    """A file written with another TensorFlow version decodes with a warning first (here
    the probabilities are the same, so the checksum then passes)."""
    import json
    import zlib

    m, images, blob = coded
    _, version, length = struct.unpack_from("<8sHI", blob)
    start = struct.calcsize("<8sHI")
    header = json.loads(zlib.decompress(blob[start : start + length]))
    header["tensorflow"] = "2.99.0"
    text = zlib.compress(json.dumps(header).encode())
    body = struct.pack("<8sHI", b"PCNNCODE", version, len(text)) + text
    other = _resealed(body + blob[start + length :])
    with pytest.warns(UserWarning, match="tensorflow: 2.99.0 there"):
        out, _ = codec.decode(m, other)
    np.testing.assert_array_equal(out, images)


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
