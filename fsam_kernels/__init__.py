"""fsam_kernels: Fisher-masked sharpness-aware minimization (FSAM) for PyTorch, with fast kernels."""
from .backends import BackendUnavailable, available_backends
from .fisher import empirical_fisher
from .optimizer import FSAM
from .family import ESAM, GSAM, SAM

__version__ = "0.1.0"

__all__ = ["FSAM", "SAM", "ESAM", "GSAM", "BackendUnavailable", "available_backends", "empirical_fisher", "__version__"]
