"""Exact oracles and helpers for tests."""

from genlab.testing.gaussian_mixture import GaussianMixture

__all__ = ["GaussianMixture"]
from genlab.testing.oracle import exact_denoiser, exact_ode_solution

__all__ += ["exact_denoiser", "exact_ode_solution"]
