"""Sample-quality metrics."""

from genlab.metrics.classifier import DigitsClassifier, confident_fraction, train_digits_classifier
from genlab.metrics.frechet import frechet_distance, gaussian_frechet, mean_cov
from genlab.metrics.likelihood import (Likelihood, bits_per_dim, bits_per_dim_of, dequantize, normal_log_prob,
                                      quantize)
from genlab.metrics.masks import mask_iou
from genlab.metrics.sliced_wasserstein import sliced_wasserstein
from genlab.metrics.wasserstein import wasserstein2

__all__ = ["DigitsClassifier", "confident_fraction", "train_digits_classifier", "frechet_distance",
           "gaussian_frechet", "mean_cov", "sliced_wasserstein", "wasserstein2", "Likelihood", "bits_per_dim",
           "bits_per_dim_of", "dequantize", "normal_log_prob", "quantize", "mask_iou"]
