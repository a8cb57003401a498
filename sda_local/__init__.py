"""sda-local: Steering-Driven Distribution Alignment (arXiv 2511.16324) for local GGUF models, in llama.cpp.

Python API::

    from sda_local import SDAEngine, align, fuse
    with SDAEngine() as engine:                      # the default model, fetched on first use
        result = engine.generate("How do I fix a flat bike tyre?", "helpfulness", strength=0.5)
        print(result.text, result.stats.tokens_per_second)
        print(align(engine, "How do I fix a flat bike tyre?", "helpfulness").amplifier)  # the full pipeline
"""

from .engine import GenerationRequest, GenerationResult, GenerationStats, GenerationStream, SDAEngine
from .engine.fusion import fuse
from .errors import ContextOverflowError, InputError, ModelError, SDAError
from .pipeline import align, align_stream
from .prompts import PRESETS

__version__ = "0.1.0"

__all__ = [
    "SDAEngine",
    "align",
    "align_stream",
    "GenerationRequest",
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
