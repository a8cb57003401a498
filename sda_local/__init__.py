"""sda-local: Steering-Driven Distribution Alignment (arXiv 2511.16324) for local GGUF models, in llama.cpp.

Python API::

    from sda_local import SDAEngine, fuse
    with SDAEngine() as engine:                      # the default model, fetched on first use
        result = engine.generate("How do I fix a flat bike tyre?", "helpfulness", strength=0.5)
        print(result.text, result.stats.tokens_per_second)
"""

from .engine import GenerationResult, GenerationStats, GenerationStream, SDAEngine
from .errors import ContextOverflowError, InputError, ModelError, SDAError
from .fusion import fuse
from .prompts import PRESETS

__version__ = "0.1.0"

__all__ = [
    "SDAEngine",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "fuse",
    "PRESETS",
    "SDAError",
    "InputError",
    "ModelError",
    "ContextOverflowError",
    "__version__",
]
