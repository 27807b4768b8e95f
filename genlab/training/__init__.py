"""Training: experiments built from configs, the accelerate trainer, EMA, plots."""

from .ema import EMA
from .experiment import Experiment, TrainConfig
from .trainer import Trainer

__all__ = ["EMA", "Experiment", "TrainConfig", "Trainer"]
