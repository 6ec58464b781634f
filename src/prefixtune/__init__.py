"""prefixtune: prefix tuning (Li & Liang, 2021) and P-tuning v2 for Hugging Face transformers."""

from .architectures import ModelSpec, StackSpec, read_spec
from .checkpoint import load
from .config import PrefixConfig
from .model import PrefixModel, attach

__all__ = ["ModelSpec", "PrefixConfig", "PrefixModel", "StackSpec", "attach", "load", "read_spec"]
__version__ = "0.1.0"
