"""2D toy distributions made in code (the FFJORD / flow-matching benchmark sets).

Each generator draws raw points and divides by fixed constants: the exact mean and standard
deviation of its distribution, derived below, so every set has zero mean and unit std per
coordinate in expectation (never estimated from the sample). Three have a density in closed form
(:func:`toy2d_log_prob`): eight_gaussians (a Gaussian mixture), checkerboard (uniform on 8 cells) and
rings (a circle blurred by a Gaussian: a Rice-type density with the Bessel function I_0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from genlab.core.bounds import PositiveInt, Range
from genlab.core.errors import did_you_mean
from genlab.core.registry import register

Generator = torch.Generator | None
Seed = Annotated[int, Range(ge=0, lt=2**63)]  # a torch.Generator seed (Experiment.heldout adds to it)


class _Toy(NamedTuple):
    sample: Callable[[int, Generator], Tensor]  # raw points, [n, 2]
    mean: tuple[float, float]  # exact E[x] per coordinate
    second_moment: tuple[float, float]  # exact E[x^2] per coordinate, noise included
    log_prob: Callable[[Tensor], Tensor] | None = None  # log-density of raw points [n, 2] -> [n], if closed-form


def _log_normal_2d(d2: Tensor, std: float) -> Tensor:
    """log N(v; 0, std^2 I_2) of v with |v|^2 = d2."""
    return -d2 / (2 * std**2) - math.log(2 * math.pi * std**2)


def _circle_log_prob(x: Tensor, radius: Tensor | float, std: float) -> Tensor:
    """log of (1 / 2 pi) int N(x - R (cos t, sin t); 0, std^2 I) dt = log N(|x| - R) in 2-D with the
    angular integral I_0(|x| R / std^2): -(r^2 + R^2) / (2 std^2) - log(2 pi std^2) + log I_0(r R / std^2)."""
    r = x.norm(dim=-1)
    arg = r * radius / std**2
    return _log_normal_2d((r - radius) ** 2, std) + torch.log(torch.special.i0e(arg))  # i0e(a) = I_0(a) e^-a


def _uniform(n: int, low: float, high: float, g: Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)


# eight_gaussians: 8 isotropic Gaussians on a circle; per coordinate E[x^2] = R^2 / 2 + s^2.
_EG_RADIUS, _EG_STD = 2.0, 0.15


def _eight_gaussians(n: int, g: Generator) -> Tensor:
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    return _polar(torch.full((n,), _EG_RADIUS), angle) + _EG_STD * torch.randn(n, 2, generator=g)


def _eight_gaussians_log_prob(x: Tensor) -> Tensor:
    centres = _polar(torch.full((8,), _EG_RADIUS, dtype=x.dtype), torch.arange(8, dtype=x.dtype) * (math.pi / 4))
    d2 = (x[:, None, :] - centres.to(x.device)).square().sum(-1)
    return (_log_normal_2d(d2, _EG_STD) - math.log(8)).logsumexp(-1)


# moons: sklearn's make_moons with t ~ U[0, pi]. Outer (cos t, sin t), inner (1 - cos t, 1/2 - sin t).
# x: mean 1/2, E[x^2] = (1/2 + 3/2) / 2 = 1.  y: mean 1/4, E[y^2] = (1/2 + 3/4 - 2/pi) / 2.
_MOONS_NOISE = 0.1


def _moons(n: int, g: Generator) -> Tensor:
    t = _uniform(n, 0.0, math.pi, g)
    inner = torch.rand(n, generator=g) < 0.5
    x = torch.where(inner, 1 - t.cos(), t.cos())
    y = torch.where(inner, 0.5 - t.sin(), t.sin())
    return torch.stack([x, y], dim=-1) + _MOONS_NOISE * torch.randn(n, 2, generator=g)


# checkerboard: uniform on the 8 cells (i, j) of a 4x4 board on [-2, 2]^2 with i + j even.
# Both marginals are U[-2, 2]: mean 0, E[x^2] = 4 / 3.
def _checkerboard(n: int, g: Generator) -> Tensor:
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2
    cell = torch.stack([col, row], dim=-1).to(torch.get_default_dtype())
    return cell - 2 + torch.rand(n, 2, generator=g)


def _checkerboard_log_prob(x: Tensor) -> Tensor:
    cell = (x + 2).floor()
    inside = ((x > -2) & (x < 2)).all(-1) & (cell.sum(-1) % 2 == 0)
    return torch.where(inside, -math.log(8.0), -math.inf)  # 8 unit cells of density 1 / 8


# swiss_roll: (t cos t, t sin t), t ~ U[a, b] with a = 3 pi / 2, b = 9 pi / 2 (sklearn's 2D roll).
# E[t^2] = (a^2 + ab + b^2) / 3 = 9.75 pi^2 and E[t^2 cos 2t] = -1/2, so
# E[x] = 2, E[x^2] = E[t^2] / 2 - 1/4;  E[y] = 2 / (3 pi), E[y^2] = E[t^2] / 2 + 1/4.
_ROLL_NOISE = 0.5
_ROLL_T2 = 9.75 * math.pi**2


def _swiss_roll(n: int, g: Generator) -> Tensor:
    t = _uniform(n, 1.5 * math.pi, 4.5 * math.pi, g)
    return _polar(t, t) + _ROLL_NOISE * torch.randn(n, 2, generator=g)


# rings: 4 equally likely circles of radius 1..4; per coordinate E[x^2] = E[R^2] / 2 + s^2, E[R^2] = 30 / 4.
_RINGS_NOISE = 0.08


def _rings(n: int, g: Generator) -> Tensor:
    radius = torch.randint(1, 5, (n,), generator=g).to(torch.get_default_dtype())
    angle = _uniform(n, 0.0, 2 * math.pi, g)
    return _polar(radius, angle) + _RINGS_NOISE * torch.randn(n, 2, generator=g)


def _rings_log_prob(x: Tensor) -> Tensor:
    radii = torch.arange(1, 5, dtype=x.dtype, device=x.device)
    return (_circle_log_prob(x[:, None, :], radii, _RINGS_NOISE) - math.log(4)).logsumexp(-1)


_EG_SQ, _RINGS_SQ = _EG_RADIUS**2 / 2 + _EG_STD**2, 30 / 4 / 2 + _RINGS_NOISE**2
_TOYS: dict[str, _Toy] = {
    "eight_gaussians": _Toy(_eight_gaussians, (0.0, 0.0), (_EG_SQ, _EG_SQ), _eight_gaussians_log_prob),
    "moons": _Toy(_moons, (0.5, 0.25), (1 + _MOONS_NOISE**2, 0.625 - 1 / math.pi + _MOONS_NOISE**2)),
    "checkerboard": _Toy(_checkerboard, (0.0, 0.0), (4 / 3, 4 / 3), _checkerboard_log_prob),
    "swiss_roll": _Toy(
        _swiss_roll, (2.0, 2 / (3 * math.pi)), (_ROLL_T2 / 2 - 0.25 + _ROLL_NOISE**2, _ROLL_T2 / 2 + 0.25 + _ROLL_NOISE**2)
    ),
    "rings": _Toy(_rings, (0.0, 0.0), (_RINGS_SQ, _RINGS_SQ), _rings_log_prob),
}
TOY2D_NAMES: tuple[str, ...] = tuple(_TOYS)


def toy2d(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` points of the named toy set: ``[n, 2]``, ~zero mean and unit std per coordinate.

    Names: ``eight_gaussians``, ``moons``, ``checkerboard``, ``swiss_roll``, ``rings``.
    """
    if name not in _TOYS:  # a ValueError: from a config, the registry adds the file and the path
        valid = ", ".join(TOY2D_NAMES)
        raise ValueError(f"unknown toy2d dataset {name!r}; valid: {valid}{did_you_mean(name, _TOYS)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    mean, std = _standardisation(name)
    return (_TOYS[name].sample(n, generator) - mean) / std


def _standardisation(name: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The set's exact mean and std per coordinate, [2] each, in ``dtype`` (torch's default if None)."""
    toy = _TOYS[name]
    mean = torch.tensor(toy.mean, dtype=dtype)
    return mean, (torch.tensor(toy.second_moment, dtype=dtype) - mean**2).sqrt()


def toy2d_log_prob(name: str, x: Tensor) -> Tensor:
    """The exact log-density [n] of the standardised toy set ``name`` at x [n, 2] (as :func:`toy2d` draws
    it): log p(m + s x) + sum log s for the raw density p, mean m and std s; ValueError for a set without
    a closed form (moons, swiss_roll)."""
    if name not in _TOYS or _TOYS[name].log_prob is None:
        exact = ", ".join(k for k, t in _TOYS.items() if t.log_prob is not None)
        raise ValueError(f"toy2d: no closed-form density for {name!r}; sets with one: {exact}")
    mean, std = (v.to(x) for v in _standardisation(name, torch.float64))
    return _TOYS[name].log_prob(mean + std * x) + std.log().sum()


@register("dataset", "toy2d")
class Toy2D(torch.utils.data.Dataset):
    """A fixed draw of ``n`` (>= 1) points of a toy set, ``self.data: [n, 2]``; items are rows ``[2]``."""

    dim = 2

    def __init__(self, name: str = "eight_gaussians", n: PositiveInt = 50_000, seed: Seed = 0) -> None:
        self.name = name
        self.data = toy2d(name, n, torch.Generator().manual_seed(seed))

    @property
    def has_density(self) -> bool:
        """Whether :meth:`log_prob` is known in closed form for this set."""
        return _TOYS[self.name].log_prob is not None

    def log_prob(self, x: Tensor) -> Tensor:
        """The set's exact log-density at x [n, 2]: [n] nats (:func:`toy2d_log_prob`)."""
        return toy2d_log_prob(self.name, x)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]
