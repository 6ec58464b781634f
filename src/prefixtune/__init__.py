"""prefixtune: prefix tuning (Li & Liang, 2021) and P-tuning v2 for Hugging Face transformers."""

from .architectures import ModelSpec, StackSpec, read_spec
from .checkpoint import load
from .config import PrefixConfig
from .engine import Engine, EngineConfig
from .model import PrefixModel, attach
from .sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "ModelSpec", "PrefixConfig", "PrefixModel", "SamplingParams", "StackSpec",
           "attach", "load", "read_spec"]
__version__ = "0.1.0"
