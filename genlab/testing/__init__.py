"""Exact oracles and helpers for tests."""

from genlab.testing.gaussian_mixture import GaussianMixture

__all__ = ["GaussianMixture"]
from genlab.testing.oracle import exact_class_denoiser, exact_denoiser, exact_ode_solution

__all__ += ["exact_class_denoiser", "exact_denoiser", "exact_ode_solution"]
