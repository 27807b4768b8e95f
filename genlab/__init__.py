"""genlab: a unified generative-model research library on PyTorch.

Importing genlab registers every built-in component, so ``genlab.build`` and ``genlab list``
see them all.
"""

from . import adapters, data, diffusion, metrics, models, objectives  # noqa: F401  (registers components)
from .core import ConfigError, GenlabError, build, load_config, register, registered

__version__ = "0.1.0"
__all__ = ["ConfigError", "GenlabError", "build", "load_config", "register", "registered", "__version__"]
