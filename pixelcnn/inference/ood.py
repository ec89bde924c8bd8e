"""Out-of-distribution (OOD) detection with trained PixelCNN++ models.

Convention everywhere: OOD is the positive class, and a higher score means more OOD.
Images are integers [N, H, W, C] in [0, 2**bits).

Per-image scores (``Scorer``), all in bits per sub-pixel:
  * "nll": -log2 p(x) / D. Alone it fails on simpler inputs, which a model of richer
    images finds more likely (Nalisnick et al. 2019, arXiv 1810.09136).
  * "likelihood_ratio": -(log2 p(x) - log2 p_background(x)) / D (Ren et al. 2019,
    arXiv 1906.02845), the background model trained on the same data with
    ``train.mutation_rate`` and ``train.l2_weight``, so that it learns the population
    level statistics the ratio cancels.
  * "complexity": -log2 p(x) / D - L(x) / D (Serra et al. 2020, arXiv 1909.11480), L(x)
    the length in bits of x under a general-purpose lossless compressor (``image_codecs.COMPRESSORS``).
Per-pixel maps: ``Scorer.pixel_log_prob`` (nats, [N, H, W], summing to log p(x)).
Batches: ``TypicalityTest`` (Nalisnick et al. 2019, arXiv 1906.02994).
Metrics: ``auroc``, ``auprc``, ``fpr_at_tpr``, ``roc_curve``.
A detector with a threshold for a chosen false-positive rate: ``Detector``.

A class-conditional model scores p(x) = mean over the classes of p(x | y): OOD inputs
have no label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pixelcnn import checks, files, image_codecs, likelihood
from pixelcnn.inference import scoring
from pixelcnn.model import weights_fingerprint

SCORES = ("nll", "likelihood_ratio", "complexity")


# ----------------------------------------------------------------------------- scores
def compressed_bits(images: np.ndarray, num_bits: int, compressor: str = "png") -> np.ndarray:
    """The exact length in bits of each image [N, H, W, C] losslessly compressed, float64
    [N] (``image_codecs.lossless_encoder``)."""
    encode = image_codecs.lossless_encoder(compressor, images.shape[-1], num_bits)
    return np.array([8.0 * len(encode(img)) for img in images])


def complexity(nll, images: np.ndarray, num_bits: int, compressor: str = "png") -> np.ndarray:
    """Input complexity (Serra et al. 2020): NLL in bits/dim minus the compressed
    length in bits per sub-pixel, float64 [N]. nll: [N] bits/dim of ``images``."""
    dims = float(np.prod(np.shape(images)[1:]))
    return np.asarray(nll, float) - compressed_bits(images, num_bits, compressor) / dims


def check_background(model, background) -> None:
    """ValueError unless the background model scores the same kind of images."""
    for what in ("image_shape", "num_bits", "num_classes"):
        mine, theirs = getattr(model, what), getattr(background, what)
        if tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(theirs)):
            raise ValueError(
                f"the background model's {what} is {theirs}, the model's {mine}: train the "
                "background on the same data (train.mutation_rate, train.l2_weight)"
            )


@dataclass
class Scorer:
    """Per-image OOD scores of a model (and optionally its background model)."""

    model: object
    background: object | None = None
    compressor: str = "png"
    batch_size: int = scoring.BATCH_SIZE

    def __post_init__(self):
        if self.background is not None:
            check_background(self.model, self.background)
        checks.check_positive_int(self.batch_size, "batch_size")
        self._pixel_fns = {}

    def pixel_log_prob(self, images, model=None) -> np.ndarray:
        """log p of each pixel given the ones before it, nats: float64 [N, H, W]; each
        image's map sums to its log p(x) (marginal over the classes of a conditional
        model)."""
        model = self.model if model is None else model
        images = np.asarray(images)
        checks.check_integer_images(images, model.image_shape, model.num_bits)
        fn = self._pixel_fn(model)
        out = []
        for start in range(0, len(images), self.batch_size):
            x = tf.constant(images[start : start + self.batch_size], tf.int32)
            out.append(fn(x).numpy().astype(np.float64))
        return np.concatenate(out)

    def _pixel_fn(self, model):
        """A compiled fn(images int [B, H, W, C]) -> per-pixel log p [B, H, W]."""
        if id(model) not in self._pixel_fns:
            k = model.num_classes

            def fn(images):
                x = likelihood.to_unit_range(images, model.num_bits)
                if k is None:
                    return likelihood.pixel_log_prob(x, model(x, None), model.num_bits)
                # p(x) = mean over y of p(x | y): the per-pixel terms of each class,
                # combined so that the map still sums to log p(x)
                per_class = tf.stack(
                    [
                        likelihood.pixel_log_prob(
                            x, model(x, tf.fill([tf.shape(x)[0]], y)), model.num_bits
                        )
                        for y in range(k)
                    ]
                )  # [K, B, H, W]
                totals = tf.reduce_sum(per_class, axis=[2, 3])  # [K, B]
                weights = tf.nn.softmax(totals, axis=0)[..., None, None]  # p(y | x)
                marginal = tf.reduce_logsumexp(totals, axis=0) - math.log(k)
                maps = tf.reduce_sum(weights * per_class, axis=0)
                # shift the posterior-weighted map so that it sums to log p(x) exactly
                shift = (marginal - tf.reduce_sum(maps, axis=[1, 2])) / float(np.prod(x.shape[1:3]))
                return maps + shift[:, None, None]

            self._pixel_fns[id(model)] = tf.function(fn, autograph=False, reduce_retracing=True)
        return self._pixel_fns[id(model)]

    def log_prob(self, images, model=None) -> np.ndarray:
        """log p(x) in nats, float64 [N]."""
        return self.pixel_log_prob(images, model).sum(axis=(1, 2))

    def scores(self, images, kinds=None) -> dict[str, np.ndarray]:
        """Each kind of score of each image, float64 [N] (higher: more OOD). kinds:
        default every kind the scorer can compute (the ratio needs a background)."""
        images = np.asarray(images)
        kinds = kinds or [k for k in SCORES if k != "likelihood_ratio" or self.background]
        shape = self.model.image_shape
        nll = likelihood.bits_per_dim(self.log_prob(images), shape)  # float64 [N]
        out = {}
        if "nll" in kinds:
            out["nll"] = nll
        if "likelihood_ratio" in kinds:
            if self.background is None:
                raise ValueError("the likelihood ratio needs a background model")
            background = likelihood.bits_per_dim(self.log_prob(images, self.background), shape)
            out["likelihood_ratio"] = nll - background
        if "complexity" in kinds:
            out["complexity"] = complexity(nll, images, self.model.num_bits, self.compressor)
        return out


# ----------------------------------------------------------------------------- metrics
def roc_curve(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of "score >= threshold is OOD", one point per distinct
    score from the highest down, starting at (0, 0) for threshold +inf."""
    scores = np.concatenate([np.asarray(out_scores, float), np.asarray(in_scores, float)])
    positive = np.concatenate([np.ones(len(out_scores)), np.zeros(len(in_scores))])
    if not len(out_scores) or not len(in_scores):
        raise ValueError("need at least one in-distribution and one OOD score")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]  # ties enter together
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(1 - positive)[last_of_tie]
    tpr = np.r_[0.0, tp / len(out_scores)]
    fpr = np.r_[0.0, fp / len(in_scores)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve: P(OOD score > in score) + P(equal) / 2."""
    fpr, tpr, _ = roc_curve(in_scores, out_scores)
    return float(np.trapezoid(tpr, fpr))


def auprc(in_scores, out_scores) -> float:
    """Average precision with OOD positive: sum over thresholds of (recall step) x
    precision, tied scores taken together."""
    fpr, tpr, _ = roc_curve(in_scores, out_scores)
    tp, fp = tpr * len(out_scores), fpr * len(in_scores)
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    return float(np.sum(np.diff(tpr) * precision[1:]))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """The lowest false-positive rate of any threshold that flags at least ``tpr`` of
    the OOD images."""
    fprs, tprs, _ = roc_curve(in_scores, out_scores)
    return float(fprs[np.argmax(tprs >= tpr - 1e-12)])


def metrics(in_scores, out_scores) -> dict:
    """AUROC, AUPRC (OOD positive) and FPR at 95% TPR."""
    return {
        "auroc": auroc(in_scores, out_scores),
        "auprc": auprc(in_scores, out_scores),
        "fpr_at_95_tpr": fpr_at_tpr(in_scores, out_scores),
    }


# ----------------------------------------------------------------------------- batches
class TypicalityTest:
    """The typicality test of Nalisnick et al. (2019): a batch of M images is OOD when
    its mean NLL lies farther from the training set's mean NLL than ``epsilon``, the
    (1 - fpr) quantile of that distance over bootstrap batches of held-out
    in-distribution images."""

    def __init__(self, batch_size: int, fpr: float = 0.01, bootstraps: int = 5000, seed=0):
        self.m = checks.check_positive_int(batch_size, "batch_size")
        self.fpr = checks.check_fraction(fpr, "fpr")
        self.bootstraps, self.seed = int(bootstraps), seed
        self.mean = self.epsilon = None

    def fit(self, train_nll, held_out_nll) -> TypicalityTest:
        """train_nll, held_out_nll: per-image NLL (any unit, the same as later)."""
        self.mean = float(np.mean(train_nll))
        rng = np.random.default_rng(self.seed)
        held_out = np.asarray(held_out_nll, float)
        picks = rng.integers(0, len(held_out), (self.bootstraps, self.m))
        distances = np.abs(held_out[picks].mean(axis=1) - self.mean)
        self.epsilon = float(np.quantile(distances, 1.0 - self.fpr))
        return self

    def statistic(self, nll) -> np.ndarray:
        """|mean NLL - the training mean| of each consecutive batch of M: float [N // M]."""
        nll = np.asarray(nll, float)
        batches = len(nll) // self.m
        return np.abs(nll[: batches * self.m].reshape(batches, self.m).mean(1) - self.mean)

    def predict(self, nll) -> np.ndarray:
        """bool [N // M]: whether each batch of M is OOD."""
        if self.epsilon is None:
            raise ValueError("fit the test first")
        return self.statistic(nll) > self.epsilon


# ----------------------------------------------------------------------------- detector
class Detector:
    """One score and a threshold fitted for a false-positive rate on in-distribution
    images: ``predict`` flags images whose score is above it. Saved as JSON naming the
    weights (their SHA-256, ``model.weights_fingerprint``) it was fitted with; loading
    against other weights is refused."""

    def __init__(self, scorer: Scorer, score: str = "likelihood_ratio", fpr: float = 0.05):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.scorer, self.score_name = scorer, score
        self.fpr = checks.check_fraction(fpr, "fpr")
        self.threshold = None
        self.sources = {}

    def fit(self, images, model_source: str = "", background_source: str = "") -> Detector:
        """The threshold: the (1 - fpr) quantile of the scores of in-distribution
        images (not the training images); the sources name the runs in the JSON."""
        in_scores = self.score(images)
        self.threshold = float(np.quantile(in_scores, 1.0 - self.fpr, method="higher"))
        self.sources = {"model": model_source, "background": background_source}
        return self

    def score(self, images) -> np.ndarray:
        return self.scorer.scores(images, [self.score_name])[self.score_name]

    def predict(self, images) -> dict:
        """{"is_outlier": bool [N], "score": float [N]}."""
        if self.threshold is None:
            raise ValueError("fit the detector first")
        scores = self.score(images)
        return {"is_outlier": scores > self.threshold, "score": scores}

    def _identity(self) -> dict:
        background = self.scorer.background
        return {
            "model": weights_fingerprint(self.scorer.model),
            "background": None if background is None else weights_fingerprint(background),
        }

    def save(self, path: str) -> None:
        fields = {
            "score": self.score_name,
            "fpr": self.fpr,
            "threshold": self.threshold,
            "compressor": self.scorer.compressor,
            "sources": self.sources,
            "weights_sha256": self._identity(),
        }
        files.write_atomic(path, json.dumps(fields, indent=2) + "\n")

    @classmethod
    def load(cls, path: str, model, background=None) -> Detector:
        """The detector saved at ``path``, for the same model (and background) weights;
        ValueError naming the runs it was fitted with otherwise."""
        with tf.io.gfile.GFile(path) as f:
            fields = json.load(f)
        detector = cls(Scorer(model, background, fields["compressor"]), fields["score"])
        if detector._identity() != fields["weights_sha256"]:
            raise ValueError(
                f"{path} was fitted with other weights (model: {fields['sources']['model']}, "
                f"background: {fields['sources']['background'] or 'none'}): load those, or "
                "fit a new detector"
            )
        detector.fpr, detector.threshold = fields["fpr"], fields["threshold"]
        detector.sources = fields["sources"]
        return detector


# ----------------------------------------------------------------------------- reports
def compare(scorer: Scorer, in_images, ood_sets: dict, kinds=None) -> tuple[dict, list]:
    """Scores of in-distribution images and of each OOD set, and the metrics of every
    score on every set: ({"in": {score: [N]}, set: {score: [M]}}, [{"ood_set", "score",
    "auroc", "auprc", "fpr_at_95_tpr"}])."""
    scores = {"in": scorer.scores(in_images, kinds)}
    rows = []
    for name, images in ood_sets.items():
        scores[name] = scorer.scores(images, kinds)
        for kind, values in scores[name].items():
            rows.append({"ood_set": name, "score": kind, **metrics(scores["in"][kind], values)})
    return scores, rows


def markdown(rows: list) -> str:
    """The metrics as a Markdown table."""
    lines = [
        "| OOD set | score | AUROC | AUPRC | FPR at 95% TPR |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['ood_set']} | {r['score']} | {r['auroc']:.4f} | {r['auprc']:.4f} | "
            f"{r['fpr_at_95_tpr']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def scores_csv(scores: dict) -> str:
    """One row per image of every set: set, index, then each score."""
    kinds = list(scores["in"])
    lines = [",".join(["set", "index", *kinds])]
    for name, values in scores.items():
        for i in range(len(values[kinds[0]])):
            lines.append(",".join([name, str(i), *(f"{values[k][i]:.6f}" for k in kinds)]))
    return "\n".join(lines) + "\n"


_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def roc_image(scores: dict, size: int = 360) -> np.ndarray:
    """ROC curves as a uint8 [H, W, 3] image: one panel per OOD set, one curve per
    score, the diagonal of chance, axes from 0 to 1 and a legend with each AUROC."""
    from PIL import Image, ImageDraw

    sets = [name for name in scores if name != "in"]
    pad, columns = 40, min(3, len(sets))
    rows = -(-len(sets) // columns)
    canvas = Image.new("RGB", (columns * (size + pad) + pad, rows * (size + 2 * pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(sets):
        left = pad + (k % columns) * (size + pad)
        top = pad + (k // columns) * (size + 2 * pad)

        def xy(fpr, tpr, left=left, top=top):
            return left + fpr * size, top + (1.0 - tpr) * size

        draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
        draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
        draw.text((left, top - 16), f"OOD set: {name}", fill="black")
        draw.text((left, top + size + 4), "false positive rate (0 to 1)", fill="black")
        for j, (kind, values) in enumerate(scores[name].items()):
            fpr, tpr, _ = roc_curve(scores["in"][kind], values)
            colour = _COLOURS[j % len(_COLOURS)]
            draw.line([xy(f, t) for f, t in zip(fpr, tpr, strict=True)], fill=colour, width=2)
            label = f"{kind}: AUROC {auroc(scores['in'][kind], values):.3f}"
            draw.text((left + 0.35 * size, top + 0.6 * size + 14 * j), label, fill=colour)
        draw.text((left + 4, top + 4), "true positive rate", fill="black")
    return np.asarray(canvas)
