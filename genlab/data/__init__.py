"""Datasets: 2D toy sets (more to come: digits, image folders)."""

from genlab.data.toy2d import TOY2D_NAMES, Toy2D, toy2d

__all__ = ["TOY2D_NAMES", "Toy2D", "toy2d"]
