"""Samplers: one base class owning the loop; each method is a small subclass."""

from .base import Sampler, SamplerState, StepInfo
from .ddim import DDIM, DDPM, posterior_std
from .dpm_solver import DPMSolverPP
from .euler import Euler, Heun
from .flow_euler import FlowEuler

__all__ = ["Sampler", "SamplerState", "StepInfo", "DDIM", "DDPM", "posterior_std", "DPMSolverPP", "Euler",
           "Heun", "FlowEuler"]
