"""Sample-quality metrics."""

from genlab.metrics.sliced_wasserstein import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
