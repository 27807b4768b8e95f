"""The continuous-time diffusion core: processes, predictions, grids, Denoiser, training-time
distributions, samplers, the probability-flow ODE and likelihood, inversion and editing (the training
objectives built on it are in :mod:`genlab.objectives`).

It does not import ``genlab.models``: samplers work on any callable.
"""

from .consistency import ConsistencyDenoiser, ConsistencyOnDenoiser, consistency_scalings
from .denoiser import BridgeDenoiser, Denoiser
from .editing import edit_times, invert, sdedit
from .grids import DDPMGrid, ExplicitGrid, Karras, TimeGrid, UniformLogSNR, UniformTime
from .grid_store import LearnedGrid
from .learned_grid import learn_grid
from .likelihood import DiffusionLikelihood, LogProbEstimate
from .ode import ODESampler, ODESolution, ProbabilityFlow
from .predictions import PREDICTIONS, convert, from_x0_eps, to_x0_eps
from .levels import Level
from .processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow, SubVP, Trigonometric
from .time_distributions import LogitNormalT, LogNormalSigma, TimeDistribution, UniformT
from .samplers import (DDIM, DDPM, DEIS, BridgeSDE, ConsistencySampler, DPMSolverPP, DPMSolverPPSDE, DPMSolverSingle,
                       Euler, EulerAncestral, EulerMaruyama, FlowEuler, Heun, MeanFlowSampler, PredictorCorrector,
                       Restart, ReverseDiffusion, Sampler, SamplerState, StepContext, StepInfo, UniPC)

__all__ = [
    "BridgeDenoiser", "BridgeSDE", "Denoiser", "edit_times", "invert", "sdedit", "DDPMGrid", "ExplicitGrid", "Karras",
    "TimeGrid", "UniformLogSNR",
    "UniformTime", "DiffusionLikelihood", "LogProbEstimate", "TimeDistribution", "UniformT", "LogNormalSigma",
    "LogitNormalT",
    "ODESampler", "ODESolution", "ProbabilityFlow", "PREDICTIONS", "convert", "from_x0_eps", "to_x0_eps",
    "EDM", "VE", "VP", "DiscreteVP", "Level", "Process", "RectifiedFlow", "SubVP", "Trigonometric",
    "DDIM", "DDPM", "DEIS", "DPMSolverPP", "DPMSolverPPSDE", "DPMSolverSingle", "Euler", "EulerAncestral", "EulerMaruyama",
    "FlowEuler", "Heun", "MeanFlowSampler", "PredictorCorrector", "Restart", "ReverseDiffusion", "Sampler", "SamplerState",
    "StepContext", "StepInfo", "UniPC", "LearnedGrid", "learn_grid",
    "ConsistencyDenoiser", "ConsistencyOnDenoiser", "consistency_scalings", "ConsistencySampler",
]
