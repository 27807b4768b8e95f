"""The continuous-time diffusion core: processes, predictions, grids, Denoiser, objectives, samplers,
the probability-flow ODE and likelihood, inversion and editing.

It does not import ``genlab.models``: samplers work on any callable.
"""

from .consistency import ConsistencyDenoiser, consistency_scalings
from .denoiser import Denoiser
from .editing import edit_times, invert, sdedit
from .grids import DDPMGrid, ExplicitGrid, Karras, TimeGrid, UniformLogSNR, UniformTime
from .grid_store import LearnedGrid
from .learned_grid import learn_grid
from .likelihood import DiffusionLikelihood, LogProbEstimate
from .objectives import DenoisingObjective, FlowMatchingObjective
from .ode import ODESampler, ODESolution, ProbabilityFlow
from .predictions import PREDICTIONS, convert, from_x0_eps, to_x0_eps
from .levels import Level
from .processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow, SubVP
from .samplers import (DDIM, DDPM, DEIS, ConsistencySampler, DPMSolverPP, DPMSolverPPSDE, DPMSolverSingle, Euler,
                       EulerAncestral, EulerMaruyama, FlowEuler, Heun, PredictorCorrector, Restart, ReverseDiffusion,
                       Sampler, SamplerState,
                       StepContext, StepInfo, UniPC)

__all__ = [
    "Denoiser", "edit_times", "invert", "sdedit", "DDPMGrid", "ExplicitGrid", "Karras", "TimeGrid", "UniformLogSNR",
    "UniformTime", "DiffusionLikelihood", "LogProbEstimate", "DenoisingObjective", "FlowMatchingObjective",
    "ODESampler", "ODESolution", "ProbabilityFlow", "PREDICTIONS", "convert", "from_x0_eps", "to_x0_eps",
    "EDM", "VE", "VP", "DiscreteVP", "Level", "Process", "RectifiedFlow", "SubVP",
    "DDIM", "DDPM", "DEIS", "DPMSolverPP", "DPMSolverPPSDE", "DPMSolverSingle", "Euler", "EulerAncestral", "EulerMaruyama",
    "FlowEuler", "Heun", "PredictorCorrector", "Restart", "ReverseDiffusion", "Sampler", "SamplerState",
    "StepContext", "StepInfo", "UniPC", "LearnedGrid", "learn_grid",
    "ConsistencyDenoiser", "consistency_scalings", "ConsistencySampler",
]
