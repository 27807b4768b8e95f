"""Samplers: one base class owning the loop; each method is a small subclass."""

from .base import Sampler, SamplerState, StepContext, StepInfo
from .bridge_sde import BridgeSDE
from .consistency import ConsistencySampler
from .ddim import DDIM, DDPM, posterior_std
from .deis import DEIS
from .dpm_solver import DPMSolverPP, DPMSolverPPSDE, dpm_solver_pp_update
from .dpm_solver_single import DPMSolverSingle
from .euler import Euler, EulerAncestral, Heun, ancestral_sigmas
from .flow_euler import FlowEuler, MeanFlowSampler
from .restart import Restart, RestartInterval
from .sde import EulerMaruyama, PredictorCorrector, ReverseDiffusion
from .unipc import UniPC, UniPCState

__all__ = [
    "Sampler", "SamplerState", "StepContext", "StepInfo", "DDIM", "DDPM", "DEIS", "posterior_std", "DPMSolverPP",
    "DPMSolverPPSDE", "dpm_solver_pp_update", "DPMSolverSingle", "Euler", "EulerAncestral", "Heun", "ancestral_sigmas",
    "FlowEuler", "MeanFlowSampler", "ConsistencySampler", "BridgeSDE",
    "Restart", "RestartInterval", "EulerMaruyama", "PredictorCorrector", "ReverseDiffusion", "UniPC", "UniPCState",
]
