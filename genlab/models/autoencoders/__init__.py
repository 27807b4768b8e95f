"""Autoencoders: the interface (:class:`Autoencoder`, :class:`Encoded`) shared by the KL and VQ
autoencoders, their objective and latent diffusion."""

from genlab.models.autoencoders.base import Autoencoder, Encoded

__all__ = ["Autoencoder", "Encoded"]
