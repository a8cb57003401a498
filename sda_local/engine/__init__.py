"""The engine layer: a loaded model, the scheduler that decodes every request's streams together, the
fusion and its native binding, and teacher forcing for the judges that read distributions.

    core.py       SDAEngine: the public API (generate, stream, submit, logits, forcing)
    requests.py   GenerationRequest, GenerationStats, GenerationResult
    scheduler.py  slots, queue, one batched decode per step
    layout.py     where each slot's streams live in llama.cpp (contexts, sequences, batches)
    sampling.py   one request's sampler chain (native SDA, numpy fallback, plain, grammar)
    text.py       incremental UTF-8 decoding and stop strings
    fusion.py     the SDA fusion in numpy (fallback and test oracle), parameter checks
    native.py     ctypes binding of libsda (native/)
    forcing.py    teacher forcing: log-probabilities of given tokens
"""

from .core import GenerationStream, SDAEngine
from .requests import GenerationRequest, GenerationResult, GenerationStats
from .scheduler import Job

__all__ = ["SDAEngine", "GenerationStream", "GenerationRequest", "GenerationResult", "GenerationStats", "Job"]
