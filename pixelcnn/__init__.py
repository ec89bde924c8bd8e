"""PixelCNN++ (Salimans et al. 2017) for TensorFlow 2 with Keras 3.

Public API:
  PixelCNNPP                       the network (a gin-configurable keras.Model)
  ModelConfig                      its architecture, as model.json holds it
  load_for_inference               a trained model from a run directory (EMA or raw)
  unpack_params                    raw outputs -> logits, means, log_scales, coeffs
  mixture_log_prob                 exact log-likelihood in nats per image
  mixture_sample                   one sample per pixel, on the b-bit grid
  bits_per_dim                     nats per image -> bits per sub-pixel
  num_params                       the network's outputs per pixel for C channels, K mixtures
  sample_fast, sample_naive        cached / reference generation (pixelcnn.inference.sampling)
  complete                         image completion
  export                           a run (or model) as a SavedModel for TF alone
  codec.encode, codec.decode       lossless compression at the model's likelihood

The names load on first use, so ``import pixelcnn`` (and the command line's ``--help``)
does not import TensorFlow until one of them is needed.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "ModelConfig": "pixelcnn.model",
    "PixelCNNPP": "pixelcnn.model",
    "bits_per_dim": "pixelcnn.likelihood",
    "mixture_log_prob": "pixelcnn.likelihood",
    "mixture_sample": "pixelcnn.likelihood",
    "num_params": "pixelcnn.likelihood",
    "unpack_params": "pixelcnn.likelihood",
    "load_for_inference": "pixelcnn.rundir",
    "complete": "pixelcnn.inference.sampling",
    "sample_fast": "pixelcnn.inference.sampling",
    "sample_naive": "pixelcnn.inference.sampling",
    "export": "pixelcnn.inference.serving",
}
_MODULES = {"codec": "pixelcnn.inference.codec"}  # modules exported under a short name

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    """Loads an exported name on first use (PEP 562) and keeps it."""
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'pixelcnn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
