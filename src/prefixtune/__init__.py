"""prefixtune: prefix tuning (Li & Liang, 2021) and P-tuning v2 for Hugging Face transformers."""

from importlib.metadata import version

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach, load
from prefixtune.core.spec import ModelSpec, StackSpec, read_spec
from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams

__version__ = version("prefixtune")  # written once, in pyproject.toml

__all__ = ["Engine", "EngineConfig", "ModelSpec", "PrefixConfig", "PrefixModel", "SamplingParams", "StackSpec",
           "attach", "load", "read_spec"]
