"""Gradient estimators through a quantizer: the forward value is the code ``q``, the gradient reaches ``e``.

- straight-through (van den Oord et al. 2017, Sec. 3.1): ``e + sg(q - e)``, Jacobian the identity;
- the rotation trick (Fifty et al. 2024, Eq. 4 and Sec. 4.2): ``sg(|q| / |e| R) e`` with ``R`` the rotation
  taking ``e / |e|`` to ``q / |q|`` in the plane they span, ``R = I - 2 w w^T + 2 q_hat e_hat^T`` with
  ``w = (e_hat + q_hat) / |e_hat + q_hat|``; the Jacobian is ``|q| / |e| R``, so the gradient keeps the
  angle it makes with ``q`` when carried back to ``e``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """``e + sg(q - e)``: the value of ``q``, the gradient of the identity for ``e``; shapes ``[..., d]``."""
    return e + (q - e).detach()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1, keepdim=True)


def rotation_trick(e: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """``sg(|q| / |e| R) e`` for ``e, q: [..., d]`` (Fifty et al. 2024): ``R e`` is computed without forming
    ``R``, as ``e - 2 (w . e) w + 2 (e_hat . e) q_hat`` with every factor but ``e`` detached."""
    e_norm, q_norm = e.norm(dim=-1, keepdim=True).clamp(min=eps), q.norm(dim=-1, keepdim=True).clamp(min=eps)
    e_hat, q_hat = (e / e_norm).detach(), (q / q_norm).detach()
    w = F.normalize(e_hat + q_hat, dim=-1, eps=eps)
    rotated = e - 2 * _dot(e, w) * w + 2 * _dot(e, e_hat) * q_hat
    return rotated * (q_norm / e_norm).detach()
