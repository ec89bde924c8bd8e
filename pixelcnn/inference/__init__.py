"""Inference with a trained model: cached generation (``generation``), sampling and
completion (``sampling``), scoring (``scoring``), lossless compression (``codec``),
out-of-distribution detection (``ood``) and export as a SavedModel (``serving``).

None of these modules imports training or gin parsing: a change to the training loop
cannot break ``evaluate`` or ``compress``."""
