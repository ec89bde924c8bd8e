"""Lossless compression of the embedded MNIST test split: our codec against the
classical lossless image codecs, side by side in one run.

    pip install -e ".[bench]"      # imagecodecs: PNG, WebP, JPEG-XL, JPEG 2000
    python benchmarks/codec.py --log-dir RUN [--num 500]

RUN is a trained run directory on 28x28x1 8-bit MNIST (the README's quickstart run,
`python main.py --config experiments/quickstart.gin single`, is the one the README's
table comes from); nothing is trained here. The run's EMA weights code the embedded
test split (500 images, `embedded_mnist`'s default split, which the quickstart run
evaluates on): one .pcnn file in each codec format (2, the exact entropy model that
``encode`` writes; 1, the float32 network's tables of earlier files), encoded and
decoded, checked to round-trip exactly. Each classical codec compresses every image
as its own file at its strongest lossless setting. Prints a table of bits/dim and
images/s (encode, decode) and the float32 matmul peak measured in the same run; writes
benchmarks/results/codec.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import matmul_peak  # noqa: E402


def classical(images: np.ndarray) -> dict:
    """bytes and images/s of each imagecodecs codec, one file per image."""
    import imagecodecs

    from pixelcnn import image_codecs

    def encoder(name):  # the package's lossless encoders (pixelcnn.image_codecs), as OOD uses
        return image_codecs.lossless_encoder(name, images.shape[-1], 8)

    codecs = {
        "PNG (level 9)": (
            lambda x: imagecodecs.png_encode(x[..., 0], level=9),
            imagecodecs.png_decode,
        ),
        "WebP lossless (level 100, method 6)": (encoder("webp"), imagecodecs.webp_decode),
        "JPEG-XL lossless (effort 9)": (encoder("jpegxl"), imagecodecs.jpegxl_decode),
        "JPEG 2000 lossless (reversible, J2K codestream)": (
            encoder("jpeg2000"),
            imagecodecs.jpeg2k_decode,
        ),
    }
    out = {}
    for name, (enc, dec) in codecs.items():
        # what each decodes to: WebP takes only RGB(A), so grey images are coded as RGB
        # with equal channels (the format stores that as cheaply as it can)
        frames = [x[..., 0] if "WebP" not in name else np.repeat(x, 3, -1) for x in images]
        start = time.perf_counter()
        blobs = [enc(x) for x in images]
        enc_s = time.perf_counter() - start
        start = time.perf_counter()
        back = [dec(b) for b in blobs]
        dec_s = time.perf_counter() - start
        for f, b in zip(frames, back, strict=True):
            if not np.array_equal(np.asarray(b).reshape(f.shape), f):
                raise SystemExit(f"{name} did not round-trip")
        nbytes = sum(len(b) for b in blobs)
        out[name] = {
            "bytes": nbytes,
            "bits_per_dim": 8 * nbytes / images.size,
            "encode_images_per_s": len(images) / enc_s,
            "decode_images_per_s": len(images) / dec_s,
        }
    return out


def ours_row(model, images, version: int) -> dict:
    """Encode and decode ``images`` in a codec format, checked to round-trip exactly."""
    from pixelcnn.inference import codec

    codec._encode(model, images[:1], None, codec.BATCH_SIZE, None, version)  # trace once
    start = time.perf_counter()
    blob = codec._encode(model, images, None, codec.BATCH_SIZE, None, version)
    enc_s = time.perf_counter() - start
    start = time.perf_counter()
    back, _ = codec.decode(model, blob)
    dec_s = time.perf_counter() - start
    if not np.array_equal(back, images):
        raise SystemExit(f"the round trip of format {version} is not exact")
    header = codec.read_header(blob)
    payload = 4 * sum(header["batch_words"])
    return {
        "bytes": len(blob),
        "payload_bytes": payload,
        "bits_per_dim": 8 * len(blob) / images.size,
        "payload_bits_per_dim": 8 * payload / images.size,
        "encode_images_per_s": len(images) / enc_s,
        "decode_images_per_s": len(images) / dec_s,
        "decode_seconds": dec_s,
        "batch_size": header["batch_size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", required=True, help="a trained MNIST run directory")
    parser.add_argument("--num", type=int, default=500, help="images of the test split")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/codec.json"))
    args = parser.parse_args()

    from pixelcnn import data, load_for_inference
    from pixelcnn.inference import scoring

    peak_before = matmul_peak("float32", windows=5)
    print(f"matmul peak float32: {peak_before:.0f} GFLOP/s", flush=True)
    model, checkpoint = load_for_inference(args.log_dir)
    _, test = data.embedded_mnist(256)
    images, _ = scoring.take(
        scoring.integer_batches(test, model.image_shape, model.num_bits, None, "test"), args.num
    )
    model_bpd = scoring.score(model, scoring.array_batches(images, None))
    model_bpd = model_bpd.summary()["bits_per_dim"]

    ours = {}
    for version, name in ((2, "pixelcnn codec (format 2, exact)"), (1, "format 1 (float32)")):
        ours[name] = ours_row(model, images, version)
        ours[name]["model_bits_per_dim"] = model_bpd
    peak_after = matmul_peak("float32", windows=5)
    rows = {**ours, **classical(images.astype(np.uint8))}
    result = {
        "run": str(args.log_dir),
        "checkpoint": str(checkpoint),
        "images": len(images),
        "matmul_peak_float32_gflops": [round(peak_before), round(peak_after)],
        "codecs": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{len(images)} images of the embedded MNIST test split, {checkpoint}")
    print(f"model's likelihood: {model_bpd:.4f} bits/dim")
    print("| codec | bits/dim | bytes per image | encode img/s | decode img/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bits_per_dim']:.3f} | {r['bytes'] / len(images):.1f} | "
            f"{r['encode_images_per_s']:.0f} | {r['decode_images_per_s']:.0f} |"
        )
    for name, r in ours.items():
        print(
            f"({name}: header and checksums included; coded words alone "
            f"{r['payload_bits_per_dim']:.4f} bits/dim, "
            f"{r['payload_bits_per_dim'] / model_bpd - 1:+.2%} against the model's; "
            f"decode {r['decode_seconds']:.1f} s)"
        )
    print(f"(matmul peak float32 {peak_before:.0f} / {peak_after:.0f} GFLOP/s before / after)")


if __name__ == "__main__":
    main()
