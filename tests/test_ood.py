"""Out-of-distribution detection: scores against independent computations, metrics
against brute-force enumeration, the background model's data and penalty, the
typicality test's false-positive rate and the detector's file (the CLI: test_cli.py)."""

import functools
import io
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import initialized_model
from PIL import Image
from scipy import special, stats

from pixelcnn import PixelCNNPP, data
from pixelcnn.inference import ood
from pixelcnn.likelihood import to_integers, to_unit_range

SHAPE = (6, 5, 1)


def model(classes=None, seed=0, shape=SHAPE):
    return initialized_model(shape, 8, classes, seed)


def images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE)).astype(np.uint8)


# ----------------------------------------------------------------------------- scores
def test_pixel_maps_sum_to_log_prob():
    m, x = model(), images(5)
    maps = ood.Scorer(m, batch_size=2).pixel_log_prob(x)
    assert maps.shape == (5, *SHAPE[:2])
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), m.log_prob(x).numpy(), rtol=1e-5)


def test_a_conditional_model_scores_the_mixture_over_its_classes():
    m, x = model(classes=3), images(4)
    per_class = np.stack([m.log_prob(x, np.full(4, y)).numpy() for y in range(3)])
    expected = special.logsumexp(per_class.astype(np.float64), axis=0) - math.log(3)
    maps = ood.Scorer(m).pixel_log_prob(x)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), expected, rtol=1e-5)


def test_nll_is_bits_per_dim_and_the_ratio_of_a_model_to_itself_is_zero():
    m, x = model(), images(4)
    scores = ood.Scorer(m, background=m).scores(x, ["nll", "likelihood_ratio"])
    expected = -m.log_prob(x).numpy() / (np.prod(SHAPE) * math.log(2))
    np.testing.assert_allclose(scores["nll"], expected, rtol=1e-5)
    np.testing.assert_allclose(scores["likelihood_ratio"], 0.0, atol=1e-9)


def test_input_complexity_subtracts_the_exact_png_length():
    m, x = model(), images(3)
    scores = ood.Scorer(m).scores(x, ["nll", "complexity"])
    for i, img in enumerate(x):
        out = io.BytesIO()
        Image.fromarray(img[..., 0], mode="L").save(out, format="PNG", compress_level=9)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.getvalue())))[..., None], img)
        bits_per_dim = 8 * len(out.getvalue()) / np.prod(SHAPE)
        assert scores["nll"][i] - scores["complexity"][i] == pytest.approx(bits_per_dim)


def test_a_background_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="image_shape"):
        ood.Scorer(model(), background=model(shape=(5, 6, 1)))
    with pytest.raises(ValueError, match="num_classes"):
        ood.Scorer(model(), background=model(classes=3))


# ----------------------------------------------------------------------------- metrics
def brute_force(in_scores, out_scores):
    """AUROC by counting pairs; the ROC points, AUPRC and FPR@95TPR by trying every
    threshold t ("score >= t is OOD") from the highest score down."""
    pairs = [(o > i) + 0.5 * (o == i) for o in out_scores for i in in_scores]
    thresholds = sorted(set(in_scores) | set(out_scores), reverse=True)
    recall_before, ap, fprs = 0.0, 0.0, []
    for t in thresholds:
        tp = sum(o >= t for o in out_scores)
        fp = sum(i >= t for i in in_scores)
        recall = tp / len(out_scores)
        ap += (recall - recall_before) * (tp / (tp + fp) if tp + fp else 1.0)
        recall_before = recall
        if recall >= 0.95:
            fprs.append(fp / len(in_scores))
    return np.mean(pairs), ap, min(fprs)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    in_scores = rng.integers(0, 6, rng.integers(3, 14)).tolist()  # few values: many ties
    out_scores = rng.integers(2, 9, rng.integers(3, 14)).tolist()
    auroc, auprc, fpr95 = brute_force(in_scores, out_scores)
    got = ood.metrics(in_scores, out_scores)
    assert got["auroc"] == pytest.approx(auroc)
    assert got["auprc"] == pytest.approx(auprc)
    assert got["fpr_at_95_tpr"] == pytest.approx(fpr95)
    assert got["auroc"] == pytest.approx(1 - ood.auroc(out_scores, in_scores))


# ----------------------------------------------------------------------------- background
def batches_of(ds):
    return [b["images"].numpy() for b in ds]


def test_mutation_replaces_the_requested_fraction_new_every_epoch_and_resumable():
    n, rate = 64, 0.2
    clean = np.full((n, 28, 28, 1), -1.0, np.float32)  # level 0 everywhere
    ds = tf.data.Dataset.from_tensor_slices({"images": clean}).batch(16)
    first = batches_of(data.mutate(ds, rate, 8, seed=3, epoch=0))
    changed = np.concatenate(first) != -1.0
    # a replaced sub-pixel keeps level 0 with probability 1/256
    p = rate * (1 - 1 / 256)
    low, high = stats.binom.interval(0.99, changed.size, p)
    assert low <= changed.sum() <= high
    levels = to_integers(np.concatenate(first), 8).numpy()
    np.testing.assert_allclose(to_unit_range(levels, 8).numpy(), np.concatenate(first), atol=1e-6)
    # the same (seed, epoch) draws the same; another epoch or seed draws anew
    for again, other in zip(first, batches_of(data.mutate(ds, rate, 8, seed=3, epoch=0))):
        np.testing.assert_array_equal(again, other)
    assert not np.array_equal(first[0], batches_of(data.mutate(ds, rate, 8, 3, epoch=1))[0])
    assert not np.array_equal(first[0], batches_of(data.mutate(ds, rate, 8, 4, epoch=0))[0])
    # a run resumed at batch 2 (the loop skips after mutating) draws what it would have
    resumed = batches_of(data.mutate(ds, rate, 8, seed=3, epoch=0).skip(2))
    for a, b in zip(first[2:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_weight_penalty_shrinks_the_effective_kernels():
    from pixelcnn.training.trainer import Trainer, TrainerOptions

    x = to_unit_range(np.random.default_rng(0).integers(0, 256, (16, *SHAPE)), 8)
    norms = {}
    for l2 in (0.0, 1.0):
        keras.utils.set_random_seed(0)

        def model_fn(dtype):
            return PixelCNNPP(SHAPE, 2, 1, 8, 3, 0.0, dtype=dtype)

        options = TrainerOptions(
            learning_rate=1e-2, learning_rate_decay=1.0, beta_1=0.9, beta_2=0.999,
            ema_decay=0.99, l2_weight=l2,
        )  # fmt: skip
        trainer = Trainer(tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn, options)
        trainer.initialize(x[:8])
        before = float(trainer.l2_norm())
        squares = sum(float(tf.reduce_sum(c.g**2)) for c in trainer.model.convolutions())
        assert before == pytest.approx(squares, rel=1e-6)
        for _ in range(5):
            trainer.train_step({"images": x})
        norms[l2] = float(trainer.l2_norm()) / before
    assert norms[1.0] < norms[0.0]


# ----------------------------------------------------------------------------- batches
def test_typicality_false_positive_rate_is_the_requested_one():
    rng = np.random.default_rng(0)
    draw = functools.partial(rng.gamma, 4.0, 0.3)  # per-image NLLs of "in-distribution" data
    test = ood.TypicalityTest(batch_size=5, fpr=0.05, seed=1).fit(draw(20_000), draw(5_000))
    flagged = test.predict(draw(20_000))  # 4,000 fresh in-distribution batches
    low, high = stats.binom.interval(0.99, len(flagged), 0.05)
    assert low <= flagged.sum() <= high
    # a shifted batch mean is flagged
    assert test.predict(draw(500) + 1.5).mean() > 0.9  # 5.6 standard deviations of a mean


# ----------------------------------------------------------------------------- detector
def test_detector_threshold_file_and_refusal_of_other_weights(tmp_path):
    m = model()
    fit_images, new_images = images(40, seed=2), images(10, seed=3)
    detector = ood.Detector(ood.Scorer(m), score="nll", fpr=0.25)
    detector.fit(fit_images, model_source="run A")
    in_scores = detector.score(fit_images)
    assert (in_scores > detector.threshold).mean() <= 0.25
    out = detector.predict(new_images)
    np.testing.assert_array_equal(out["is_outlier"], out["score"] > detector.threshold)
    path = str(tmp_path / "detector.json")
    detector.save(path)
    again = ood.Detector.load(path, m)
    assert again.threshold == detector.threshold and again.score_name == "nll"
    np.testing.assert_array_equal(again.predict(new_images)["is_outlier"], out["is_outlier"])
    with pytest.raises(ValueError, match="run A"):
        ood.Detector.load(path, model(seed=1))
