"""Autoencoders: the interface (:class:`Autoencoder`, :class:`Encoded`) shared by the KL and VQ
autoencoders, their objective and latent diffusion; Stable Diffusion's KL (``autoencoder_kl``) and VQ
(``autoencoder_vq``) autoencoders in diffusers' layout."""

from genlab.models.autoencoders.base import Autoencoder, Encoded
from genlab.models.autoencoders.kl import AutoencoderKL
from genlab.models.autoencoders.networks import ConvAutoencoder, Decoder, Encoder
from genlab.models.autoencoders.vq import VQAutoencoder

__all__ = ["Autoencoder", "AutoencoderKL", "ConvAutoencoder", "Decoder", "Encoded", "Encoder", "VQAutoencoder"]
