"""Judges from the CLI's specs (``--judge``), with their options."""

from __future__ import annotations

from typing import Optional, Tuple

from ..errors import InputError
from .local import DEFAULT_SCORING, LocalJudge, check_scoring
from .remote import DEFAULT_REMOTE_MODEL, OPENAI_URL, RemoteJudge
from .selfscore import SelfJudge
from .verifier import AutoJudge, VerifyJudge

# make_judge's options for a remote judge (the first four are the CLI's --judge-timeout, --judge-retries,
# --judge-max-wait, --allow-insecure-judge); a local judge ignores them.
REMOTE_OPTIONS = ("read_timeout", "max_attempts", "max_wait", "allow_insecure", "connect_timeout", "api_key")
JUDGE_OPTIONS = ("scoring",) + REMOTE_OPTIONS  # scoring: --judge-scoring, for local judges
# The judge of --align without --strength or --judge: a program's check where the instruction is verifiable,
# else the self judge, which steered best in judge-bench and the verifiable pipeline on the default model and
# Gemma 3 270M (README, "Choosing the judge" and "Steering without echo").
DEFAULT_JUDGE = "auto"
# Judges that run on the generation model itself: they need its engine.
ENGINE_JUDGES = ("local", "self", "auto")


def parse_judge_spec(spec: Optional[str], url: Optional[str] = None) -> Tuple[str, str]:
    """(kind, argument) of a judge spec, kind lower-cased: "local:PATH" -> ("local", "PATH"). No spec means
    ``openai`` when a URL is given, else DEFAULT_JUDGE."""
    if spec is None:
        spec = "openai" if url else DEFAULT_JUDGE
    kind, _, arg = spec.strip().partition(":")
    return kind.lower(), arg


def make_judge(spec: Optional[str], engine, *, url: Optional[str] = None, **options):
    """A judge from a CLI-style spec: none | auto | self | verify | local | local:PATH_OR_NAME | openai |
    openai:MODEL.

    ``engine`` serves ``self`` and ``local``. ``url`` (any OpenAI-compatible base URL) implies ``openai``
    when no spec is given. ``options`` (JUDGE_OPTIONS, None = default): ``scoring`` ("expected" or "greedy")
    applies to local judges; the others (REMOTE_OPTIONS) go to a RemoteJudge. Returns None for ``none``.
    """
    unknown = sorted(set(options) - set(JUDGE_OPTIONS))
    if unknown:
        raise InputError(f"unknown judge option(s) {', '.join(unknown)} (known: {', '.join(JUDGE_OPTIONS)})")
    options = {k: v for k, v in options.items() if v is not None}
    scoring = check_scoring(options.pop("scoring", DEFAULT_SCORING))
    remote_options = options
    kind, arg = parse_judge_spec(spec, url)
    if kind == "none" and not arg:
        return None
    if url and kind != "openai":
        raise InputError("--judge-url only applies to --judge openai[:MODEL]")
    if kind == "local":
        if not arg:
            return LocalJudge(engine, scoring=scoring)
        from ..engine import SDAEngine

        threads = engine.n_threads if engine is not None else None
        kv = getattr(engine, "kv", None)  # the same KV cache settings as the generating model's
        kv_options = dict(cache_type_k=kv.type_k, cache_type_v=kv.type_v, flash_attn=kv.flash_attn) if kv else {}
        # Offloaded and batched like the generating model (a GPU user's judge model belongs on the GPU too).
        same = dict(n_gpu_layers=engine.n_gpu_layers, exact="on" if engine.batching.exact else "off") if hasattr(engine, "batching") else {}
        judge_engine = SDAEngine(arg, n_ctx=4096, streams="contexts", n_threads=threads,
                                 repack=getattr(engine, "repack", None), **kv_options, **same)
        return LocalJudge(judge_engine, owns_engine=True, scoring=scoring)
    if kind == "self" and not arg:
        return SelfJudge(engine)
    if kind == "auto" and not arg:
        return AutoJudge(engine)
    if kind == "verify" and not arg:
        return VerifyJudge()
    if kind == "openai":
        return RemoteJudge(arg or DEFAULT_REMOTE_MODEL, base_url=url or OPENAI_URL, **remote_options)
    raise InputError(f"unknown judge {spec!r} (auto, self, verify, local, local:PATH|NAME, openai, openai:MODEL, none)")
