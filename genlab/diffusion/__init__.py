"""The continuous-time diffusion core: processes, predictions, grids, Denoiser, objectives, samplers.

It does not import ``genlab.models``: samplers work on any callable.
"""

from .denoiser import Denoiser
from .grids import DDPMGrid, ExplicitGrid, Karras, TimeGrid, UniformLogSNR, UniformTime
from .objectives import DenoisingObjective, FlowMatchingObjective
from .predictions import PREDICTIONS, convert, from_x0_eps, to_x0_eps
from .processes import EDM, VE, VP, DiscreteVP, Level, Process, RectifiedFlow, SubVP
from .samplers import DDIM, DDPM, DPMSolverPP, Euler, FlowEuler, Heun, Sampler, SamplerState, StepInfo

__all__ = [
    "Denoiser", "DDPMGrid", "ExplicitGrid", "Karras", "TimeGrid", "UniformLogSNR", "UniformTime",
    "DenoisingObjective", "FlowMatchingObjective", "PREDICTIONS", "convert", "from_x0_eps", "to_x0_eps",
    "EDM", "VE", "VP", "DiscreteVP", "Level", "Process", "RectifiedFlow", "SubVP",
    "DDIM", "DDPM", "DPMSolverPP", "Euler", "FlowEuler", "Heun", "Sampler", "SamplerState", "StepInfo",
]
