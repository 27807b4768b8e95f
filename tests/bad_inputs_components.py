"""Bad inputs to every registered component, one line per case (run by tests/test_component_ranges.py).

``CONFIG_CASES``: (config name, space-separated overrides, fragment of the ConfigError): configs/<name>.yaml
with the overrides, built by ``Experiment.from_config``. The overrides hold no spaces themselves (YAML
flow mappings use quoted keys, ``{"type":"explicit"}``).

``API_CASES``: (case id, a zero-argument callable doing the bad thing, exception type, message fragment):
direct construction, sampling with bad arguments, wrong-shaped and non-finite models, bad grids.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from genlab.core.errors import ConfigError, GenlabError, NonFiniteError, ShapeError
from genlab.data import Digits, Toy2D
from genlab.data.images import ImageFolder
from genlab.diffusion import (DDIM, DDPM, DEIS, EDM, VE, VP, Denoiser, DiscreteVP, DPMSolverPP,
                              DPMSolverSingle, Euler, EulerAncestral, EulerMaruyama, ExplicitGrid, FlowEuler, Heun,
                              Karras, PredictorCorrector, RectifiedFlow, Restart, TimeGrid, UniformLogSNR, UniformTime,
                              UniPC, invert, sdedit)
from genlab.diffusion.grid_store import LearnedGrid, load_grids
from genlab.diffusion.grids import DDPMGrid
from genlab.diffusion.likelihood import DiffusionLikelihood
from genlab.diffusion.time_distributions import LogitNormalT, LogNormalSigma
from genlab.objectives import DenoisingObjective
from genlab.diffusion.ode import ODESampler
from genlab.diffusion.samplers.restart import RestartInterval
from genlab.models import DiT, UNet
from genlab.models.flows import MAF, AffineCoupling, BatchNormFlow, Flow, GlowCoupling, SplineCoupling
from genlab.models.mlp import MLP

CONFIG_CASES: list[tuple[str, str, str]] = [
    # processes
    ("toy2d", "process.beta_start=0", "process.beta_start: expected float > 0 and < 1, got int 0"),
    ("toy2d", "process.beta_end=1.5", "process.beta_end: expected float > 0 and < 1, got float 1.5"),
    ("toy2d", "process.t_min=0", "process.t_min: expected float > 0 and < 1, got int 0"),
    ("toy2d", "process.t_min=1", "process.t_min: expected float > 0 and < 1, got int 1"),
    ("toy2d", "process.t_min=.nan", "process.t_min: expected float > 0 and < 1, got float nan"),
    ("toy2d", "process.cosine_s=-1", "process.cosine_s: expected float >= 0, got int -1"),
    ("toy2d", "process.schedule=cosin", "process.schedule: expected one of 'linear', 'scaled_linear', 'cosine'"),
    ("toy2d", "process.beta_start=0.02 process.beta_end=0.0001", "process: VP: beta_start (0.02) must be <= beta_end (0.0001)"),
    ("toy2d", "process.type=sub_vp process.beta_end=1", "process.beta_end: expected float > 0 and < 1, got int 1"),
    ("toy2d", "process.type=ddpm process.timesteps=1", "process.timesteps: expected int >= 2, got int 1"),
    ("toy2d", "process.type=ddpm process.timesteps=10.5", "process.timesteps: expected int >= 2, got float 10.5"),
    ("toy2d", "process.type=ddpm process.alphas_cumprod=[0.9,1.5]", "process.alphas_cumprod: expected list of float > 0 and < 1 or None, got list [0.9, 1.5]"),
    ("toy2d", "process.type=ddpm process.alphas_cumprod=[0.9,0.95]", "process: DiscreteVP: alphas_cumprod must decrease strictly (from the data to the noise), but alphas_cumprod[1] = 0.95 >= alphas_cumprod[0] = 0.9"),
    ("toy2d", "process.type=ddpm process.alphas_cumprod=[0.9]", "process: DiscreteVP: alphas_cumprod must be a list of at least 2 values (from the data to the noise), got shape [1]"),
    ("toy2d", "process.type=ddpm process.beta_start=0.03", "process: DiscreteVP: beta_start (0.03) must be <= beta_end (0.02)"),
    ("toy2d", "process.type=ve process.sigma_min=0", "process.sigma_min: expected float > 0, got int 0"),
    ("toy2d", "process.type=ve process.sigma_max=-1", "process.sigma_max: expected float > 0, got int -1"),
    ("toy2d", "process.type=ve process.sigma_min=5 process.sigma_max=1", "process: VE: sigma_min (5) must be < sigma_max (1)"),
    ("toy2d", "process.type=ve process.t_min=2", "process.t_min: expected float > 0 and < 1, got int 2"),
    ("toy2d", "process.type=edm process.sigma_min=0", "process.sigma_min: expected float > 0, got int 0"),
    ("toy2d", "process.type=edm process.sigma_max=.inf", "process.sigma_max: expected float > 0, got float inf"),
    ("toy2d", "process.type=edm process.sigma_min=80 process.sigma_max=1", "process: EDM: sigma_min (80) must be < sigma_max (1)"),
    ("toy2d", "process.type=rectified_flow process.t_min=0", "process.t_min: expected float > 0 and < 1, got int 0"),
    # grids
    ("toy2d", "sampler.grid.type=uniform sampler.grid.t_min=-0.1", "sampler.grid.t_min: expected float >= 0 or None, got float -0.1"),
    ("toy2d", "sampler.grid.type=uniform sampler.grid.t_max=0", "sampler.grid.t_max: expected float > 0 or None, got int 0"),
    ("toy2d", "sampler.grid.type=uniform sampler.grid.t_min=0.5 sampler.grid.t_max=0.2", "sampler.grid: UniformTime: t_min (0.5) must be < t_max (0.2)"),
    ("toy2d", "sampler.grid.type=uniform sampler.grid.final=max", "sampler.grid.final: expected one of 'zero', 'min', got str 'max'"),
    ("toy2d", "sampler.grid.type=log_snr sampler.grid.snr_shift=-1", "sampler.grid.snr_shift: expected float >= 0, got int -1"),
    ("toy2d", "sampler.grid.type=log_snr sampler.grid.sigma_min=0", "sampler.grid.sigma_min: expected float > 0 or None, got int 0"),
    ("toy2d", "sampler.grid.type=log_snr sampler.grid.sigma_min_steps=0", "sampler.grid.sigma_min_steps: expected int >= 1 or None, got int 0"),
    ("toy2d", "sampler.grid.type=log_snr sampler.grid.sigma_min_order=0", "sampler.grid.sigma_min_order: expected float > 0, got int 0"),
    ("toy2d", "sampler.grid.type=log_snr sampler.grid.sigma_min=2 sampler.grid.sigma_max=1", "sampler.grid: UniformLogSNR: sigma_min (2) must be < sigma_max (1)"),
    ("toy2d", "sampler.grid.type=karras sampler.grid.rho=0", "sampler.grid.rho: expected float > 0, got int 0"),
    ("toy2d", "sampler.grid.type=karras sampler.grid.sigma_max=-1", "sampler.grid.sigma_max: expected float > 0 or None, got int -1"),
    ("toy2d", "sampler.grid.type=karras sampler.grid.sigma_min=2 sampler.grid.sigma_max=1", "sampler.grid: Karras: sigma_min (2) must be < sigma_max (1)"),
    ("toy2d", "sampler.grid.type=ddpm sampler.grid.offset=-1", "sampler.grid.offset: expected int >= 0, got int -1"),
    ("toy2d", "sampler.grid.type=ddpm sampler.grid.timesteps=[5,-1]", "sampler.grid.timesteps: expected list of float >= 0 or None, got list [5, -1]"),
    ("toy2d", "sampler.grid.type=ddpm sampler.grid.timesteps=[1,5,0]", "sampler.grid: DDPMGrid: timesteps must decrease strictly (from the noise to the data), but timesteps[1] = 5 >= timesteps[0] = 1"),
    ("toy2d", "sampler.grid.type=explicit sampler.grid.times=[0.0,0.5,1.0]", "sampler.grid: ExplicitGrid: times must decrease strictly (from the noise to the data), but times[1] = 0.5 >= times[0] = 0"),
    ("toy2d", "sampler.grid.type=explicit sampler.grid.times=[1.0,-0.5,0.0]", "sampler.grid.times[1]: expected float >= 0, got float -0.5"),
    ("toy2d", "sampler.grid.type=explicit sampler.grid.times=[1.0,.nan,0.0]", "sampler.grid.times[1]: expected float >= 0, got float nan"),
    ("toy2d", "sampler.grid.type=explicit sampler.grid.times=[1.0]", "sampler.grid: ExplicitGrid: times must be a list of at least 2 values (from the noise to the data), got shape [1]"),
    ("toy2d", "sampler.grid.type=learned sampler.grid.times=[1.0,1.0,0.0]", "sampler.grid: LearnedGrid: times must decrease strictly (from the noise to the data), but times[1] = 1 >= times[0] = 1"),
    ("toy2d", "sampler.grid.type=learned sampler.grid.times=[1.0,-1,0.0]", "sampler.grid.times: expected list of float >= 0 or None, got list [1.0, -1, 0.0]"),
    # samplers
    ("toy2d", "sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.steps=-3", "sampler.steps: expected int >= 1, got int -3"),
    ("toy2d", "sampler.steps=2.5", "sampler.steps: expected int >= 1, got float 2.5"),
    ("toy2d", "sampler.order=4", "sampler.order: expected one of 1, 2, 3, got int 4"),
    ("toy2d", "sampler.eta=-0.5", "sampler.eta: expected float >= 0, got float -0.5"),
    ("toy2d", "sampler.type=dpm_solver_pp_sde sampler.eta=-1", "sampler.eta: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=dpm_solver_single sampler.order=0", "sampler.order: expected one of 1, 2, 3, got int 0"),
    ("toy2d", "sampler.type=dpm_solver_single sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.type=deis sampler.order=5", "sampler.order: expected one of 1, 2, 3, got int 5"),
    ("toy2d", "sampler.type=deis sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.type=unipc sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.type=unipc sampler.variant=bh3", "sampler.variant: expected one of 'bh1', 'bh2', got str 'bh3'"),
    ("toy2d", "sampler.type=ddim sampler.eta=-1", "sampler.eta: expected float >= 0 and <= 1, got int -1"),
    ("toy2d", "sampler.type=ddim sampler.eta=1.5", "sampler.eta: expected float >= 0 and <= 1, got float 1.5"),
    ("toy2d", "sampler.type=ddim sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("digits", "sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("digits", "sampler.variance=medium", "sampler.variance: expected one of 'small', 'large', got str 'medium'"),
    ("toy2d", "sampler.type=euler sampler.s_churn=-1", "sampler.s_churn: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=euler sampler.s_noise=-1", "sampler.s_noise: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=euler sampler.s_tmin=-1", "sampler.s_tmin: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=euler sampler.s_tmax=-1", "sampler.s_tmax: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=euler sampler.s_tmax=.nan", "sampler.s_tmax: expected float >= 0, got float nan"),
    ("toy2d", "sampler.type=euler sampler.s_tmin=3 sampler.s_tmax=1", "sampler: Euler: s_tmin (3) must be <= s_tmax (1)"),
    ("toy2d", "sampler.type=heun sampler.s_churn=-0.5", "sampler.s_churn: expected float >= 0, got float -0.5"),
    ("toy2d", "sampler.type=heun sampler.s_tmin=2 sampler.s_tmax=1", "sampler: Heun: s_tmin (2) must be <= s_tmax (1)"),
    ("toy2d", "sampler.type=euler_ancestral sampler.eta=-1", "sampler.eta: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=euler_ancestral sampler.s_noise=-1", "sampler.s_noise: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=restart sampler.rho=0", "sampler.rho: expected float > 0, got int 0"),
    ("toy2d", "sampler.type=restart sampler.restart_churn=-1", "sampler.restart_churn: expected float >= 0, got int -1"),
    ("toy2d", "sampler.type=restart sampler.s_tmin=2 sampler.s_tmax=1", "sampler: Restart: s_tmin (2) must be <= s_tmax (1)"),
    ("toy2d", 'sampler.type=restart sampler.restarts=[{"sigma_min":0.3,"sigma_max":0.1}]', "sampler.restarts[0]: restart interval: need 0 < sigma_min < sigma_max, got 0.3, 0.1"),
    ("toy2d", 'sampler.type=restart sampler.restarts=[{"sigma_min":0,"sigma_max":0.1}]', "sampler.restarts[0].sigma_min: expected float > 0, got int 0"),
    ("toy2d", 'sampler.type=restart sampler.restarts=[{"sigma_min":0.1,"sigma_max":0.3,"steps":0}]', "sampler.restarts[0].steps: expected int >= 1, got int 0"),
    ("toy2d", 'sampler.type=restart sampler.restarts=[{"sigma_min":0.1,"sigma_max":0.3,"repeats":-1}]', "sampler.restarts[0].repeats: expected int >= 0, got int -1"),
    ("toy2d", 'sampler.type=restart sampler.restarts={"0":[1,2,0.06,0.3]}', "sampler: restarts.0: N_restart must be >= 2 (the restart grid's points, so that its steps >= 1), got int 1"),
    ("toy2d", 'sampler.type=restart sampler.restarts={"0":[3,-1,0.06,0.3]}', "sampler: restarts.0: [N_restart, K, t_min, t_max] = list [3, -1, 0.06, 0.3]: RestartInterval: repeats must be >= 0, got -1"),
    ("toy2d", "sampler.type=pc sampler.snr=0", "sampler.snr: expected float > 0, got int 0"),
    ("toy2d", "sampler.type=pc sampler.n_corrector_steps=-1", "sampler.n_corrector_steps: expected int >= 0, got int -1"),
    ("toy2d", 'sampler.type=pc sampler.predictor={"type":"ddim","eta":2}', "sampler.predictor.eta: expected float >= 0 and <= 1, got int 2"),
    ("toy2d", 'sampler.type=pc sampler.predictor={"type":"euler","s_tmin":2,"s_tmax":1}', "sampler.predictor: Euler: s_tmin (2) must be <= s_tmax (1)"),
    ("toy2d", "sampler.type=pc sampler.corrector=ald", "sampler.corrector: expected one of 'langevin', 'none', got str 'ald'"),
    ("toy2d", "sampler.type=euler_maruyama sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.type=reverse_diffusion sampler.steps=-1", "sampler.steps: expected int >= 1, got int -1"),
    ("toy2d", "sampler.type=flow_euler sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    ("toy2d", "sampler.type=ode sampler.rtol=0", "sampler.rtol: expected float > 0, got int 0"),
    ("toy2d", "sampler.type=ode sampler.atol=-1", "sampler.atol: expected float > 0, got int -1"),
    ("toy2d", "sampler.type=ode sampler.steps=0", "sampler.steps: expected int >= 1 or None, got int 0"),
    ("toy2d", "sampler.type=ode sampler.method=rk45", "sampler.method: expected one of 'dopri5'"),
    # objectives and time distributions
    ("toy2d", "objective.min_snr_gamma=0", "objective.min_snr_gamma: expected float > 0, got int 0"),
    ("toy2d", "objective.sigma_data=0", "objective.sigma_data: expected float > 0, got int 0"),
    ("toy2d", "objective.weighting=snrr", "objective.weighting: expected one of 'constant', 'snr', 'min_snr', 'edm', got str 'snrr'"),
    ("toy2d", 'objective.t_distribution={"type":"log_normal","p_std":-1}', "objective.t_distribution.p_std: expected float >= 0, got int -1"),
    ("toy2d", 'objective.t_distribution={"type":"log_normal","p_mean":.inf}', "objective.t_distribution.p_mean: expected finite float, got float inf"),
    ("toy2d", 'objective.t_distribution={"type":"logit_normal","std":-1}', "objective.t_distribution.std: expected float >= 0, got int -1"),
    ("toy2d", "objective.type=flow_matching objective.min_snr_gamma=-1", "objective.min_snr_gamma: expected float > 0, got int -1"),
    # models
    ("toy2d", "model.hidden=0", "model.hidden: expected int >= 1, got int 0"),
    ("toy2d", "model.depth=0", "model.depth: expected int >= 1, got int 0"),
    ("toy2d", "model.dim=0", "model.dim: expected int >= 1, got int 0"),
    ("toy2d", "model.time_dim=1", "model.time_dim: expected int >= 2, got int 1"),
    ("toy2d", "model.dropout=1", "model.dropout: expected float >= 0 and < 1, got int 1"),
    ("toy2d", "model.dropout=-0.1", "model.dropout: expected float >= 0 and < 1, got float -0.1"),
    ("toy2d", "model.num_classes=0", "model.num_classes: expected int >= 1 or None, got int 0"),
    ("toy2d", "model.fourier_scale=0", "model.fourier_scale: expected float > 0, got int 0"),
    ("toy2d", "model.time_embedding=fourier model.time_dim=7", "model: MLP: time_dim must be even with time_embedding='fourier' (cos and sin pairs), got 7"),
    ("digits", "model.channels=0", "model.channels: expected int >= 1 or None, got int 0"),
    ("digits", "model.channel_mult=[1,0]", "model.channel_mult: expected list of int >= 1 or None, got list [1, 0]"),
    ("digits", "model.channel_mult=[]", "model: UNet: channel_mult must be non-empty (one entry per resolution level), got []"),
    ("digits", "model.attention_levels=[2]", "model: UNet: attention_levels [2] out of range for 2 levels (indices into channel_mult: 0 to 1)"),
    ("digits", "model.attention_levels=[-1]", "model.attention_levels: expected list of int >= 0 or None, got list [-1]"),
    ("digits", "model.num_heads=3", "model: UNet: attention width 64 is not divisible by num_heads=3"),
    ("digits", "model.num_heads=0", "model.num_heads: expected int >= 1 or None, got int 0"),
    ("digits", "model.head_dim=0", "model.head_dim: expected int >= 1 or None, got int 0"),
    ("digits", "model.norm_groups=0", "model.norm_groups: expected int >= 1, got int 0"),
    ("digits", "model.norm_groups=5", "model: UNet: every level width [32, 64] (channels * channel_mult) must be divisible by norm_groups=5"),
    ("digits", "model.num_res_blocks=0", "model.num_res_blocks: expected int >= 1 or None, got int 0"),
    ("digits", "model.dropout=1", "model.dropout: expected float >= 0 and < 1 or None, got int 1"),
    ("digits", "model.class_dropout=1.5", "model.class_dropout: expected float >= 0 and <= 1, got float 1.5"),
    ("digits", "model.num_classes=0", "model.num_classes: expected int >= 1 or None, got int 0"),
    ("digits", "model.transformer_depth=0", "model.transformer_depth: expected int >= 1, got int 0"),
    ("digits", "model.norm_eps=0", "model.norm_eps: expected float > 0, got int 0"),
    ("digits", "model.time_freq_shift=2", "model.time_freq_shift: expected float >= 0 and <= 1, got int 2"),
    ("digits", "model.channels=9 model.norm_groups=9 model.num_heads=1 model.time_embedding=fourier", "model: UNet: channels (9) must be even with time_embedding='fourier'"),
    ("digits", "model.type=dit model.patch_size=3", "model: DiT: input_size (16) must be divisible by patch_size (3); divisors of 16: 1, 2, 4, 8, 16"),
    ("digits", "model.type=dit model.hidden=30 model.num_heads=3", "model: DiT: hidden (30) must be a multiple of 4 (the 2D sin-cos position embedding)"),
    ("digits", "model.type=dit model.hidden=64 model.num_heads=5", "model: DiT: hidden (64) must be divisible by num_heads (5)"),
    ("digits", "model.type=dit model.mlp_ratio=0.001", "model: DiT: the MLP width int(hidden * mlp_ratio) = int(384 * 0.001) must be >= 1"),
    ("digits", "model.type=dit model.depth=0", "model.depth: expected int >= 1 or None, got int 0"),
    ("digits", "model.type=dit model.mlp_ratio=0", "model.mlp_ratio: expected float > 0, got int 0"),
    ("digits", "model.type=dit model.class_dropout=-0.1", "model.class_dropout: expected float >= 0 and <= 1, got float -0.1"),
    ("digits", "model.type=dit model.input_size=0", "model.input_size: expected int >= 1, got int 0"),
    ("digits", "model.type=dit model.mlp_norm_eps=0", "model.mlp_norm_eps: expected float > 0, got int 0"),
    ("digits", "model.type=dit model.preset=M/2", "model.preset: expected one of 'S/2'"),
    # datasets
    ("toy2d", "data.n=0", "data.n: expected int >= 1, got int 0"),
    ("toy2d", "data.seed=-1", "data.seed: expected int >= 0 and < 9223372036854775808, got int -1"),
    ("toy2d", "data.name=moon", "toy2d.yaml: data: unknown toy2d dataset 'moon'; valid: eight_gaussians, moons"),
    ("digits", "data.image_size=12", "data.image_size: expected one of 8, 16, 32, got int 12"),
    ("digits", "data.test_fraction=1", "data.test_fraction: expected float > 0 and < 1, got int 1"),
    ("digits", "data.n=0", "data.n: expected int >= 1 or None, got int 0"),
    ("digits", "data.seed=4294967296", "data.seed: expected int >= 0 and < 4294967296, got int 4294967296"),
    ("digits", "data.split=tset", "data.split: expected one of 'train', 'test', 'all', got str 'tset'"),
    ("digits", "data.type=image_folder data.root=/nowhere data.image_size=0", "data.image_size: expected int >= 1, got int 0"),
    ("digits", "data.type=image_folder data.root=/nowhere data.channels=2", "data.channels: expected one of 1, 3, got int 2"),
    ("digits", "data.type=torchvision data.name=MNIST data.root=/nowhere data.limit=0", "data.limit: expected int >= 1 or None, got int 0"),
    ("digits", "data.type=torchvision data.name=MNIST data.root=/nowhere data.image_size=-1", "data.image_size: expected int >= 1, got int -1"),
]


def _vp() -> VP:
    return VP()


def _nan_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A diverged model: NaN everywhere."""
    return torch.full_like(x, math.nan)


def _half_nan_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NaN for the first sample only."""
    out = torch.zeros_like(x)
    out[0] = math.nan
    return out


def _nan_sample(sampler: object, process: object = None, prediction: str = "eps") -> object:
    """Sample 4 points of [2] from a NaN model predicting ``prediction`` on ``process`` (default VP)."""
    return sampler.sample(Denoiser(_nan_model, process or VP(), prediction), shape=(4, 2), progress=False)  # type: ignore[attr-defined]


def _zero_sample(sampler: object, **kwargs: object) -> object:
    """Sample 4 points of [2] from an eps = 0 model on VP, with ``kwargs`` for ``sample``."""
    return sampler.sample(Denoiser(lambda x, t: torch.zeros_like(x), VP()), shape=(4, 2), progress=False,  # type: ignore[attr-defined]
                          **kwargs)


def _shaped(fn: Callable[[torch.Tensor], torch.Tensor]) -> Denoiser:
    """A Denoiser on VP whose model outputs ``fn(x)``."""
    return Denoiser(lambda x, t: fn(x), VP())


class _Backwards(TimeGrid):
    """A grid that runs from the data to the noise, as no sampler expects (a ZeroDivisionError in
    DPM-Solver++ before the check)."""

    def __call__(self, process: object, steps: int) -> torch.Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


_TMP: list[tempfile.TemporaryDirectory] = []


def _file(text: str, name: str = "grids.json") -> str:
    """A file holding ``text`` in a temporary directory (kept until the interpreter exits)."""
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory())
    path = Path(_TMP[0].name) / f"{len(list(Path(_TMP[0].name).iterdir()))}_{name}"
    path.write_text(text)
    return str(path)


_STORED_BAD = ('{"format": "genlab.learned_grids", "version": 1, "grids": [{"sampler": {"type": "ddim", "eta": 0.0}, '
               '"steps": 2, "times": [0.0, 0.5, 1.0], "process": "VP(t_min=0.001, t_max=1)"}]}')
X = torch.zeros(4, 2)

API_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # construction: processes and grids
    ("vp_beta_start_zero", lambda: VP(beta_start=0), ValueError, "VP: beta_start must be > 0 and < 1, got 0"),
    ("vp_betas_decreasing", lambda: VP(beta_start=0.02, beta_end=1e-4), ValueError, "VP: beta_start (0.02) must be <= beta_end (0.0001)"),
    ("ve_sigmas_swapped", lambda: VE(sigma_min=5, sigma_max=1), ValueError, "VE: sigma_min (5) must be < sigma_max (1)"),
    ("edm_sigma_min_negative", lambda: EDM(sigma_min=-1), ValueError, "EDM: sigma_min must be > 0, got -1"),
    ("ddpm_one_timestep", lambda: DiscreteVP(timesteps=1), ValueError, "DiscreteVP: timesteps must be >= 2, got 1"),
    ("ddpm_table_increasing", lambda: DiscreteVP(alphas_cumprod=[0.5, 0.9]), ValueError, "alphas_cumprod[1] = 0.9 >= alphas_cumprod[0] = 0.5"),
    ("ddpm_table_outside", lambda: DiscreteVP(alphas_cumprod=[1.0, 0.9]), ValueError, "DiscreteVP: alphas_cumprod[0] = 1.0 must be in (0, 1)"),
    ("rf_t_min_zero", lambda: RectifiedFlow(t_min=0), ValueError, "RectifiedFlow: t_min must be > 0 and < 1, got 0"),
    ("uniform_t_min_above_t_max", lambda: UniformTime(t_min=0.5, t_max=0.2), ValueError, "UniformTime: t_min (0.5) must be < t_max (0.2)"),
    ("karras_rho_zero", lambda: Karras(rho=0), ValueError, "Karras: rho must be > 0, got 0"),
    ("karras_sigmas_swapped", lambda: Karras(sigma_min=2, sigma_max=1), ValueError, "Karras: sigma_min (2) must be < sigma_max (1)"),
    ("log_snr_min_steps_zero", lambda: UniformLogSNR(sigma_min_steps=0), ValueError, "UniformLogSNR: sigma_min_steps must be >= 1, got 0"),
    ("explicit_increasing", lambda: ExplicitGrid([0.0, 0.5, 1.0]), ValueError, "ExplicitGrid: times must decrease strictly (from the noise to the data), but times[1] = 0.5 >= times[0] = 0"),
    ("explicit_single_time", lambda: ExplicitGrid([1.0]), ValueError, "ExplicitGrid: times must be a list of at least 2 values (from the noise to the data), got shape [1]"),
    ("explicit_nan", lambda: ExplicitGrid([1.0, math.nan, 0.0]), ValueError, "ExplicitGrid: times[1] = nan must be a finite time >= 0"),
    ("explicit_negative", lambda: ExplicitGrid([1.0, 0.5, -0.1]), ValueError, "ExplicitGrid: times[2] = -0.1 must be a finite time >= 0"),
    ("explicit_above_t_max", lambda: ExplicitGrid([1.5, 0.5, 0.0])(VP(), 2), ValueError, "ExplicitGrid: times[0] = 1.5 is above t_max = 1 of VP(t_min=0.001, t_max=1)"),
    ("explicit_above_t_max_sampling", lambda: _zero_sample(DDIM(2, grid=ExplicitGrid([50.0, 1.0, 0.0]))), ValueError, "times[0] = 50 is above t_max = 1"),
    ("explicit_edm_fits", lambda: DDIM(2, grid=ExplicitGrid([81.0, 1.0, 0.0])).timesteps(EDM()), ValueError, "times[0] = 81 is above t_max = 80 of EDM"),
    ("learned_times_repeated", lambda: LearnedGrid(times=[1.0, 0.5, 0.5, 0.0]), ValueError, "LearnedGrid: times must decrease strictly (from the noise to the data), but times[2] = 0.5 >= times[1] = 0.5"),
    ("learned_times_above_t_max", lambda: DDIM(2, grid=LearnedGrid(times=[2.0, 1.0, 0.0])).timesteps(VP()), ValueError, "LearnedGrid: times[0] = 2 is above t_max = 1"),
    ("ddpm_grid_offset_beyond_table", lambda: DDPMGrid("leading", offset=500)(DiscreteVP(), 10), ValueError, "DDPMGrid: times[0] = 1.401 is above t_max = 1"),
    ("ddpm_grid_too_many_steps", lambda: DDIM(2000, grid=DDPMGrid("leading")).timesteps(DiscreteVP()), ValueError, "DDPMGrid: 2000 steps on the 1000 steps of DiscreteVP(t_min=0.001, t_max=1): a DDPM grid takes at most T = 1000 steps"),
    ("ddpm_grid_repeated_index", lambda: DDPMGrid(timesteps=[999, 500, 500])(DiscreteVP(), 3), ValueError, "DDPMGrid: timesteps must decrease strictly (from the noise to the data), but timesteps[2] = 500 >= timesteps[1] = 500"),
    # corrupt grids.json
    ("grids_json_invalid", lambda: load_grids(_file("{not json")), GenlabError, "grids.json: cannot read the learned grids (JSONDecodeError"),
    ("grids_json_list", lambda: load_grids(_file("[1, 2]")), GenlabError, "grids.json: not a learned-grids file (format 'a JSON list, not a mapping'"),
    ("grids_json_no_grids", lambda: load_grids(_file('{"format": "genlab.learned_grids"}')), GenlabError, "grids.json: 'grids' must be a list of grid records, got NoneType"),
    ("grids_json_record_keys", lambda: load_grids(_file('{"format": "genlab.learned_grids", "grids": [{"steps": 2}]}')), GenlabError, "grids.json: grids[0] lacks 'sampler', 'times', 'process'"),
    ("grids_json_bad_times", lambda: DDIM(2, grid=LearnedGrid(path=_file(_STORED_BAD))).timesteps(VP()), GenlabError, "the grid stored for {'type': 'ddim', 'eta': 0.0} steps=2 is not a grid: LearnedGrid: times must decrease strictly"),
    # construction: samplers
    ("ddim_eta_negative", lambda: DDIM(eta=-1), ValueError, "DDIM: eta must be >= 0 and <= 1, got -1"),
    ("ddim_eta_above_one", lambda: DDIM(eta=1.5), ValueError, "DDIM: eta must be >= 0 and <= 1, got 1.5"),
    ("ddim_steps_zero", lambda: DDIM(steps=0), ValueError, "DDIM: steps must be >= 1, got 0"),
    ("ddim_steps_fraction", lambda: DDIM(steps=2.5), ValueError, "DDIM: steps must be an integer >= 1, got 2.5"),
    ("ddpm_steps_negative", lambda: DDPM(steps=-2), ValueError, "DDPM: steps must be >= 1, got -2"),
    ("euler_window_swapped", lambda: Euler(s_tmin=2, s_tmax=1), ValueError, "Euler: s_tmin (2) must be <= s_tmax (1)"),
    ("heun_churn_negative", lambda: Heun(s_churn=-1), ValueError, "s_churn must be >= 0, got -1"),
    ("euler_ancestral_noise_negative", lambda: EulerAncestral(s_noise=-1), ValueError, "EulerAncestral: s_noise must be >= 0, got -1"),
    ("dpm_solver_order_four", lambda: DPMSolverPP(order=4), ValueError, "DPMSolverPP: order must be 1, 2 or 3, got 4"),
    ("dpm_solver_eta_negative", lambda: DPMSolverPP(eta=-0.5), ValueError, "DPMSolverPP: eta must be >= 0, got -0.5"),
    ("unipc_variant", lambda: UniPC(variant="bh3"), ValueError, "UniPC variant must be 'bh1' or 'bh2', got 'bh3'"),
    ("pc_corrector_steps_negative", lambda: PredictorCorrector(n_corrector_steps=-1), ValueError, "PredictorCorrector: n_corrector_steps must be >= 0, got -1"),
    ("restart_interval_swapped", lambda: RestartInterval(0.3, 0.1), ConfigError, "restart interval: need 0 < sigma_min < sigma_max, got 0.3, 0.1"),
    ("restart_interval_steps_zero", lambda: RestartInterval(0.1, 0.3, steps=0), ValueError, "RestartInterval: steps must be >= 1, got 0"),
    ("restart_rho_zero", lambda: Restart(rho=0), ValueError, "Restart: rho must be > 0, got 0"),
    ("ode_atol_zero", lambda: ODESampler(atol=0), ValueError, "ODESampler: atol must be > 0, got 0"),
    ("ode_steps_zero", lambda: ODESampler(steps=0, method="euler"), ValueError, "ODESampler: steps must be >= 1, got 0"),
    # construction: objectives, models, data
    ("log_normal_std_negative", lambda: LogNormalSigma(p_std=-1), ValueError, "LogNormalSigma: p_std must be >= 0, got -1"),
    ("logit_normal_std_nan", lambda: LogitNormalT(std=math.nan), ValueError, "LogitNormalT: std must be >= 0, got nan"),
    ("objective_sigma_data_zero", lambda: DenoisingObjective(sigma_data=0), ValueError, "DenoisingObjective: sigma_data must be > 0, got 0"),
    ("mlp_hidden_zero", lambda: MLP(hidden=0), ValueError, "MLP: hidden must be >= 1, got 0"),
    ("mlp_dropout_one", lambda: MLP(dropout=1.0), ValueError, "MLP: dropout must be >= 0 and < 1, got 1.0"),
    ("mlp_fourier_odd", lambda: MLP(time_dim=7, time_embedding="fourier"), ValueError, "MLP: time_dim must be even with time_embedding='fourier'"),
    ("unet_channels_zero", lambda: UNet(channels=0), ValueError, "UNet: channels must be >= 1, got 0"),
    ("unet_channel_mult_empty", lambda: UNet(channels=8, channel_mult=(), norm_groups=4), ValueError, "UNet: channel_mult must be non-empty"),
    ("unet_channel_mult_zero", lambda: UNet(channels=8, channel_mult=(1, 0), norm_groups=4), ValueError, "UNet: channels and channel_mult must be positive, got widths [8, 0]"),
    ("unet_attention_level", lambda: UNet(preset="tiny", attention_levels=(3,), norm_groups=8), ValueError, "UNet: attention_levels [3] out of range for 2 levels"),
    ("unet_heads", lambda: UNet(preset="tiny", num_heads=3, norm_groups=8), ValueError, "UNet: attention width 64 is not divisible by num_heads=3"),
    ("unet_norm_eps_zero", lambda: UNet(norm_eps=0.0), ValueError, "UNet: norm_eps must be > 0, got 0.0"),
    ("dit_patch", lambda: DiT(input_size=10, patch_size=4), ValueError, "DiT: input_size (10) must be divisible by patch_size (4); divisors of 10: 1, 2, 5, 10"),
    ("dit_heads", lambda: DiT(hidden=64, num_heads=5), ValueError, "DiT: hidden (64) must be divisible by num_heads (5)"),
    ("dit_hidden_multiple_of_4", lambda: DiT(hidden=30, num_heads=3), ValueError, "DiT: hidden (30) must be a multiple of 4"),
    ("dit_mlp_ratio_zero", lambda: DiT(mlp_ratio=0.0), ValueError, "DiT: mlp_ratio must be > 0, got 0.0"),
    ("dit_class_dropout", lambda: DiT(class_dropout=1.5), ValueError, "DiT: class_dropout must be >= 0 and <= 1, got 1.5"),
    ("toy2d_n_zero", lambda: Toy2D(n=0), ValueError, "Toy2D: n must be >= 1, got 0"),
    ("toy2d_name", lambda: Toy2D(name="moon", n=4), ValueError, "unknown toy2d dataset 'moon'"),
    ("digits_n_zero", lambda: Digits(n=0), ValueError, "Digits: n must be >= 1, got 0"),
    ("digits_seed_negative", lambda: Digits(seed=-1), ValueError, "Digits: seed must be >= 0 and < 4294967296, got -1"),
    ("image_folder_size_zero", lambda: ImageFolder("/nowhere", image_size=0), ValueError, "ImageFolder: image_size must be >= 1, got 0"),
    # sampling arguments
    ("sample_steps_zero", lambda: _zero_sample(DDIM(3), steps=0), ValueError, "DDIM.sample: steps must be an integer >= 1 (or None for the sampler's own 3), got 0"),
    ("sample_steps_negative", lambda: _zero_sample(DPMSolverPP(3), steps=-1), ValueError, "DPMSolverPP.sample: steps must be an integer >= 1"),
    ("sample_steps_float", lambda: _zero_sample(UniPC(3), steps=2.0), ValueError, "UniPC.sample: steps must be an integer >= 1 (or None for the sampler's own 3), got 2.0"),
    ("sample_steps_bool", lambda: _zero_sample(DDIM(3), steps=True), ValueError, "got True"),
    ("timesteps_steps_zero", lambda: DDIM(3).timesteps(VP(), 0), ValueError, "DDIM.timesteps: steps must be an integer >= 1"),
    ("increasing_grid_dpm_solver", lambda: _zero_sample(DPMSolverPP(2, grid=_Backwards())), ValueError, "DPMSolverPP: grid '_Backwards': times must decrease strictly (from the noise to the data), but times[1] = 0.5 >= times[0] = 0"),
    ("learned_times_steps_mismatch", lambda: _zero_sample(DDIM(2, grid=LearnedGrid(times=[1.0, 0.5, 0.0])), steps=3), ConfigError, "the times have 2 steps, the sampler asks for 3"),
    # model outputs of the wrong shape (the Denoiser)
    ("denoiser_output_b1", lambda: _shaped(lambda x: x[:, :1])(X, 0.5), ShapeError, "Denoiser: the model's output must have the shape of its input x [4, 2], got [4, 1]"),
    ("denoiser_output_b21", lambda: _shaped(lambda x: x[..., None])(X, 0.5), ShapeError, "input x [4, 2], got [4, 2, 1]"),
    ("denoiser_output_scalar", lambda: _shaped(lambda x: x.sum())(X, 0.5), ShapeError, "input x [4, 2], got []"),
    ("denoiser_output_tuple", lambda: _shaped(lambda x: (x, x))(X, 0.5), ShapeError, "input x [4, 2], got tuple"),
    ("denoiser_shape_ddim", lambda: DDIM(3).sample(_shaped(lambda x: x[:, :1]), shape=(4, 2), progress=False), ShapeError, "got [4, 1]"),
    ("denoiser_shape_heun", lambda: Heun(3).sample(_shaped(lambda x: x[:1]), shape=(4, 2), progress=False), ShapeError, "input x [4, 2], got [1, 2]"),
    ("denoiser_shape_training", lambda: DenoisingObjective()(_shaped(lambda x: x[:, :1]), X), ShapeError, "got [4, 1]"),
    # non-finite results at the end of sampling
    ("nan_ddim", lambda: _nan_sample(DDIM(3)), NonFiniteError, "DDIM: 4 of 4 samples hold NaN or inf after sampling; the model's output is probably non-finite"),
    ("nan_ddpm", lambda: _nan_sample(DDPM(3)), NonFiniteError, "DDPM: 4 of 4 samples hold NaN or inf"),
    ("nan_dpm_solver_pp", lambda: _nan_sample(DPMSolverPP(3)), NonFiniteError, "DPMSolverPP: 4 of 4 samples hold NaN or inf"),
    ("nan_dpm_solver_single", lambda: _nan_sample(DPMSolverSingle(3)), NonFiniteError, "DPMSolverSingle: 4 of 4"),
    ("nan_unipc", lambda: _nan_sample(UniPC(3)), NonFiniteError, "UniPC: 4 of 4 samples hold NaN or inf"),
    ("nan_deis", lambda: _nan_sample(DEIS(3)), NonFiniteError, "DEIS: 4 of 4"),
    ("nan_euler", lambda: _nan_sample(Euler(3)), NonFiniteError, "Euler: 4 of 4"),
    ("nan_heun", lambda: _nan_sample(Heun(3), EDM()), NonFiniteError, "Heun: 4 of 4 samples hold NaN or inf"),
    ("nan_euler_ancestral", lambda: _nan_sample(EulerAncestral(3)), NonFiniteError, "EulerAncestral: 4 of 4"),
    ("nan_euler_maruyama", lambda: _nan_sample(EulerMaruyama(3)), NonFiniteError, "EulerMaruyama: 4 of 4 samples hold NaN or inf"),
    ("nan_pc", lambda: _nan_sample(PredictorCorrector(3)), NonFiniteError, "PredictorCorrector: 4 of 4"),
    ("nan_restart", lambda: _nan_sample(Restart(3)), NonFiniteError, "Restart: 4 of 4"),
    ("nan_flow_euler", lambda: _nan_sample(FlowEuler(3), RectifiedFlow(), "velocity"), NonFiniteError,
     "FlowEuler: 4 of 4"),
    ("nan_ode", lambda: ODESampler(2, method="euler").solve(Denoiser(_nan_model, VP()), shape=(4, 2), progress=False), NonFiniteError, "ODESampler: 4 of 4"),
    ("nan_one_sample", lambda: DDIM(3).sample(Denoiser(_half_nan_model, VP()), shape=(4, 2), progress=False), NonFiniteError, "DDIM: 1 of 4 samples hold NaN or inf"),
    ("nan_start", lambda: DDIM(3).sample(Denoiser(lambda x, t: torch.zeros_like(x), VP()), torch.full((4, 2), math.nan), progress=False), NonFiniteError, "the input x already held NaN or inf"),
    ("nan_sdedit", lambda: sdedit(DDIM(3), Denoiser(_nan_model, VP()), X, 0.5, progress=False), NonFiniteError, "DDIM: 4 of 4 samples hold NaN or inf"),
    ("nan_invert", lambda: invert(DDIM(3), Denoiser(_nan_model, VP()), X, progress=False), NonFiniteError, "DDIM: 4 of 4 samples hold NaN or inf"),
    ("nan_likelihood", lambda: DiffusionLikelihood(Denoiser(_nan_model, VP()), method="euler", steps=2).log_prob(X), NonFiniteError, "DiffusionLikelihood: 4 of 4 log-probabilities are NaN or inf"),
    # normalizing flows
    ("flow_coupling_parity", lambda: AffineCoupling([2], parity=2), ValueError, "AffineCoupling: parity must be >= 0 and <= 1, got 2"),
    ("flow_coupling_shape", lambda: AffineCoupling([2, 3]), ValueError, "AffineCoupling: shape must be [D] (vectors) or [C, H, W] (images)"),
    ("flow_spline_bound_zero", lambda: SplineCoupling(4, bound=0.0), ValueError, "SplineCoupling: bound must be > 0, got 0.0"),
    ("flow_maf_features_zero", lambda: MAF(0), ValueError, "MAF: features must be >= 1, got 0"),
    ("flow_glow_one_channel", lambda: GlowCoupling(1), ValueError, "GlowCoupling: channels must be >= 2 (a channel split), got 1"),
    ("flow_batch_norm_momentum", lambda: BatchNormFlow(2, momentum=0.0), ValueError, "BatchNormFlow: momentum must be > 0 and <= 1, got 0.0"),
    ("flow_wrong_shape", lambda: Flow([2], []).log_prob(torch.zeros(3, 4)), ShapeError, "Flow: expected x: [B, 2], got [3, 4]"),
    ("flow_labels_missing", lambda: Flow([2], [], num_classes=3).log_prob(torch.zeros(3, 2)), ValueError, "Flow: cond must be class labels, a long tensor [3] in 0..2, got None"),
]
