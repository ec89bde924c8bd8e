"""PixelCNN++ (Salimans et al. 2017) for TensorFlow 2 with Keras 3.

Public API:
  PixelCNNPP                       the network (a gin-configurable keras.Model)
  ModelConfig                      its architecture, as model.json holds it
  load_for_inference               a trained model from a run directory (EMA or raw)
  unpack_params                    raw outputs -> logits, means, log_scales, coeffs
  mixture_log_prob                 exact log-likelihood in nats per image
  mixture_sample                   one sample per pixel, on the b-bit grid
  bits_per_dim                     nats per image -> bits per sub-pixel
  sample_fast, sample_naive        cached / reference generation (pixelcnn.sampling)
  complete                         image completion
  export                           a run (or model) as a SavedModel for TF alone
  codec.encode, codec.decode       lossless compression at the model's likelihood
"""

from pixelcnn import codec
from pixelcnn.checkpoints import load_for_inference
from pixelcnn.likelihood import (
    bits_per_dim,
    mixture_log_prob,
    mixture_sample,
    num_params,
    unpack_params,
)
from pixelcnn.model import ModelConfig, PixelCNNPP
from pixelcnn.sampling import complete, sample_fast, sample_naive
from pixelcnn.serving import export

__all__ = [
    "ModelConfig",
    "PixelCNNPP",
    "bits_per_dim",
    "codec",
    "complete",
    "export",
    "load_for_inference",
    "mixture_log_prob",
    "mixture_sample",
    "num_params",
    "sample_fast",
    "sample_naive",
    "unpack_params",
]
