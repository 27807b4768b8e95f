"""Conditioning layers shared by the backbones: time and label embeddings, scale-shift modulation; SELU."""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal, get_args

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import Range
from genlab.core.errors import ShapeError
from genlab.models.embeddings import timestep_embedding


TimeEmbeddingKind = Literal["sinusoidal", "fourier"]
Dropout = Annotated[float, Range(ge=0, lt=1)]  # a dropout probability: 1 would drop everything
FreqShift = Annotated[float, Range(ge=0, le=1)]  # the sinusoids' frequency shift: 0 (ADM) or 1 (diffusers' DiT)


@functools.cache
def _avx512_float32_selu_is_slow() -> bool:
    """Whether ATen runs its AVX-512 kernels here. There its float32 ELU family (``torch.selu``) is not
    vectorised (expm1 element by element): a [256, 64] forward took 147 us, against 34 us under
    ATEN_CPU_CAPABILITY=avx2 and 54 us for the float64 kernel (torch 2.14, measured on this project's
    machine)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


class SELU(nn.Module):
    """``nn.SELU`` (Klambauer et al. 2017, Eq. 2; no parameters): on float32 CPU tensors where ATen runs
    its AVX-512 kernels it is computed by the float64 kernel, in place on the float64 copy (autograd's
    backward of the in-place op reads its result, which costs less than reading the input), and rounded
    back (there about 65 us less per [256, 64] call over forward and backward inside ``concat_mlp``,
    measured in a probe; the values within one float32 rounding); ``torch.selu`` everywhere else.
    Both are native ops: autograd, double backward, ``torch.func`` transforms work. ``x: [*] -> [*]``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and _avx512_float32_selu_is_slow():
            return torch.selu_(x.double()).to(torch.float32)
        return torch.selu(x)


class FourierFeatures(nn.Module):
    """Random Fourier features [cos(2 pi w t), sin(2 pi w t)], w ~ N(0, scale^2) fixed (Tancik et al.
    2020; score_sde's GaussianFourierProjection): t [B] -> [B, dim] float32, ``dim`` even. ``w`` is a
    persistent buffer (``weight: [dim // 2]``), so checkpoints keep it; the angles are computed in
    float32. Suited to times of order 1 (t in [0, 1], a log-sigma): ``scale`` is in cycles per unit."""

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FourierFeatures: dim must be even and >= 2, got {dim}")
        self.register_buffer("weight", torch.randn(dim // 2) * scale, persistent=True)

    def forward(self, t: Tensor) -> Tensor:
        angles = 2 * math.pi * rearrange(t.float(), "b -> b 1") * rearrange(self.weight.float(), "h -> 1 h")
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Time features, then Linear-SiLU-Linear (DDPM / ADM time embedding): t [B] -> [B, dim].

    ``kind="sinusoidal"`` (the default): ``freq_dim`` sinusoids with ``max_period``, ``freq_shift`` and
    ``flip_sin_to_cos`` (see :func:`timestep_embedding`; Vaswani et al. 2017). ``kind="fourier"``:
    ``freq_dim`` random Fourier features of scale ``fourier_scale`` (:class:`FourierFeatures`, kept as
    the submodule ``fourier``; score_sde's NCSN++), for which the sinusoid options are unused.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0,
                 flip_sin_to_cos: bool = True, kind: TimeEmbeddingKind = "sinusoidal",
                 fourier_scale: float = 16.0) -> None:
        super().__init__()
        if kind not in get_args(TimeEmbeddingKind):
            raise ValueError(f"TimestepEmbedding: kind must be 'sinusoidal' or 'fourier', got {kind!r}")
        self.freq_dim, self.max_period, self.freq_shift, self.flip_sin_to_cos = freq_dim, max_period, freq_shift, flip_sin_to_cos
        self.kind, self.fourier_scale = kind, fourier_scale
        self.fourier = FourierFeatures(freq_dim, fourier_scale) if kind == "fourier" else None
        self.linear_1, self.act, self.linear_2 = nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)

    def features(self, t: Tensor) -> Tensor:
        """The time features before the MLP: ``t [B] -> [B, freq_dim]`` float32."""
        if self.fourier is not None:
            return self.fourier(t)
        return timestep_embedding(t, self.freq_dim, self.max_period, self.freq_shift, self.flip_sin_to_cos)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.features(t).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))

    def interval_twin(self) -> TimestepEmbedding:
        """A new embedding of this one's configuration for a second scalar input (the interval t - r of a
        two-time model, the guidance weight w of a guidance-distilled one: :func:`condition_embedding`), with
        a zero output layer: a backbone that gains it computes what it computed before until the new
        input's weights are trained."""
        twin = TimestepEmbedding(self.linear_2.out_features, self.freq_dim, self.max_period, self.freq_shift,
                                 self.flip_sin_to_cos, self.kind, self.fourier_scale)
        nn.init.zeros_(twin.linear_2.weight)
        nn.init.zeros_(twin.linear_2.bias)
        return twin


class LabelEmbedding(nn.Module):
    """Class labels [B] -> [B, dim], with index ``num_classes`` the null class for classifier-free
    guidance (Ho & Salimans 2022). Label -1 means null; during training each label is replaced by
    null with probability ``dropout`` (DiT's LabelEmbedder)."""

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int | None = None) -> Tensor:
        if labels is None:
            labels = torch.full((batch or 1,), -1, dtype=torch.long, device=self.embedding.weight.device)
        if self.training and self.dropout > 0:
            labels = drop_labels(labels, self.dropout)
        return self.embedding(torch.where(labels < 0, self.num_classes, labels))


def drop_labels(labels: Tensor, p: float) -> Tensor:
    """``labels: [B]`` with each replaced by the null class -1 with probability ``p`` (classifier-free
    guidance training, Ho & Salimans 2022)."""
    return torch.where(torch.rand(labels.shape, device=labels.device) < p, -1, labels)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Scale-shift modulation x (1 + scale) + shift (FiLM; AdaGN in ADM, adaLN in DiT); shift and
    scale broadcast against x."""
    return torch.addcmul(shift, x, 1 + scale)


def batch_times(t: Tensor | float, x: Tensor, model: str, name: str = "t") -> Tensor:
    """The model time as ``[B]`` for x [B, ...] from a scalar, ``[1]`` or ``[B]``; ``model`` names the
    caller in the error."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ShapeError(f"{model}: expected {name}: [B] = [{x.shape[0]}] or a scalar, got {list(t.shape)}")
    return t


def batch_labels(class_labels: Tensor | None, x: Tensor, num_classes: int, model: str, learnt: int = 0) -> Tensor:
    """Class labels ``[B]`` (long) checked against ``num_classes`` (and ``learnt`` classes after the null
    class's row, ids num_classes + 1 ...: textual inversion's); None means the null class (-1)."""
    if class_labels is None:
        return torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    if class_labels.shape != (x.shape[0],):
        raise ShapeError(f"{model}: expected class_labels: [B] = [{x.shape[0]}], got {list(class_labels.shape)}")
    bad = (class_labels >= num_classes) & ((class_labels <= num_classes) | (class_labels > num_classes + learnt))
    if class_labels.is_floating_point() or bad.any() or (class_labels < -1).any():
        more = f" or in [{num_classes + 1}, {num_classes + learnt}] (learnt classes)" if learnt else ""
        raise ValueError(f"{model}: class_labels must be integers in [-1, {num_classes}){more}, got {class_labels}")
    return class_labels.long()


GUIDANCE_INPUT_SCALE = 1000.0  # w is embedded as 1000 w, a time-like range (diffusers' FluxTransformer2DModel)


def condition_embedding(time_embed: nn.Module, label_embed: LabelEmbedding | None, x: Tensor, t: Tensor | float,
                        class_labels: Tensor | None, model: str, interval_embed: nn.Module | None = None,
                        interval: Tensor | float | None = None, guidance_embed: nn.Module | None = None,
                        guidance_scale: Tensor | float | None = None) -> Tensor:
    """The conditioning of a backbone: ``time_embed(t) + label_embed(class_labels)`` -> ``[B, D]`` for
    ``x: [B, ...]``, ``t`` a scalar, ``[1]`` or ``[B]``, ``class_labels: [B]`` or None (the null class).
    Without ``label_embed`` (a model built with ``num_classes=None``) it is the time embedding alone,
    and labels are an error; ``model`` names the caller in errors.

    Two-time models (MeanFlow's u(z, r, t), Geng et al. 2025, Sec. 4: the network sees (t, t - r)) add
    ``interval_embed(interval)``, ``interval`` the model-time difference t_in(t) - t_in(r) as a scalar,
    ``[1]`` or ``[B]``; None means r = t (interval 0: the instantaneous velocity). An interval given to a
    model built without ``interval_embedding`` is an error.

    Guidance-distilled models (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Sec. 4.1: the
    student takes the guidance weight w as an input, Fourier-embedded like the time) add
    ``guidance_embed(1000 w)`` for ``guidance_scale`` w as a scalar, ``[1]`` or ``[B]`` (genlab's scale:
    w = 1 is the conditional model); such a model needs w, and any other model refuses it."""
    c = time_embed(batch_times(t, x, model))
    if guidance_embed is not None:
        if guidance_scale is None:
            raise ValueError(f"{model}: this model was built with guidance_embedding=True and needs guidance_scale "
                             "(the guidance weight w, a scalar or [B])")
        w = batch_times(guidance_scale, x, model, "guidance_scale")
        c = c + guidance_embed(GUIDANCE_INPUT_SCALE * w.to(torch.float32))
    elif guidance_scale is not None:
        raise ValueError(f"{model}: guidance_scale given, but the model was built with guidance_embedding=False; "
                         "build it with guidance_embedding=True for a guidance-distilled student")
    if interval_embed is not None:
        c = c + interval_embed(batch_times(0.0 if interval is None else interval, x, model))
    elif interval is not None:
        raise ValueError(f"{model}: interval given, but the model was built with interval_embedding=False; build "
                         "it with interval_embedding=True for a two-time (MeanFlow) model")
    if label_embed is not None:
        learnt = label_embed.embedding.num_embeddings - label_embed.num_classes - 1
        return c + label_embed(batch_labels(class_labels, x, label_embed.num_classes, model, learnt))
    if class_labels is not None:
        raise ValueError(f"{model}: class_labels given, but the model was built with num_classes=None")
    return c
