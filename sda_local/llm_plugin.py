"""The ``llm`` plugin (``pip install 'sda-local[llm]'``): sda-local models inside the ``llm`` CLI.

Models: ``sda`` (the default catalogue model), ``sda-<name>`` for every cached catalogue model, and
``sda-<name>`` for every GGUF registered with ``llm sda register PATH --name NAME``. Options (``-o key value``)
choose the alignment (``align``; without it, plain generation), the amplifier or the judge, and sampling.
``llm``'s ``--system`` is the system prompt of both streams; ``llm -c`` and ``llm chat`` continue a
conversation with its history in both streams, and a process keeps its engines (and their caches) loaded.
The pipeline's results (amplifier, score, judge, ...) go to ``response_json``, so ``llm logs --json`` shows
them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

import click
import llm
from pydantic import Field, field_validator

from .engine.fusion import MAX_STRENGTH, MAX_T0, MIN_T0, MIN_TOP_P
from .errors import SDAError
from .judging.factory import DEFAULT_JUDGE
from .seeds import MAX_SEED

REGISTRY_FILE = "sda-models.json"  # in llm's user directory: {name: GGUF path}
_engines: Dict[Tuple, object] = {}  # one engine per (model, n_ctx, n_gpu_layers, streams), for the process
_engines_lock = threading.Lock()


def _registry_path() -> Path:
    return llm.user_dir() / REGISTRY_FILE


def _update_registry(change) -> None:
    """Change the registry locked and atomically (two `llm sda register` at once both keep their entry)."""
    from .jsonl import update_json

    try:
        update_json(_registry_path(), change)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot update {_registry_path()}: {exc}") from None


def registered_models() -> Dict[str, str]:
    from .jsonl import read_json_object

    try:
        data = read_json_object(_registry_path())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()}


@llm.hookimpl
def register_models(register):
    from . import models as catalogue

    register(SDAModel("sda", None))
    try:
        cached = [m.name for m in catalogue.catalogue() if m.is_cached()]
    except SDAError:
        cached = []
    for name in cached:
        register(SDAModel(f"sda-{name}", name))
    for name, path in registered_models().items():
        if name not in cached:
            register(SDAModel(f"sda-{name}", path))


@llm.hookimpl
def register_commands(cli):
    @cli.group(name="sda")
    def sda_group():
        """sda-local models: register your own GGUF files as llm models."""

    @sda_group.command(name="register")
    @click.argument("model")
    @click.option("--name", required=True, help="The model becomes sda-NAME.")
    def register(model: str, name: str):
        """Register a GGUF file, or any model sda-local takes (ollama:NAME[:TAG], lmstudio:PUB/REPO/FILE, a
        name from sda-local models pull), as the llm model sda-NAME."""
        from . import models as catalogue

        try:
            catalogue.check_name(name)
        except SDAError as exc:
            raise click.ClickException(str(exc)) from None
        path = Path(model).expanduser()
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise click.ClickException(f"{path} is not a GGUF file")
            spec = str(path.resolve())
        elif model.lower().endswith(".gguf") or "/" in model and ":" not in model:
            raise click.ClickException(f"no such file: {model}")
        else:
            try:
                catalogue.resolve(model)
            except SDAError as exc:
                raise click.ClickException(str(exc)) from None
            spec = model
        _update_registry(lambda models: models.__setitem__(name, spec))
        click.echo(f"registered sda-{name}: {spec}")

    @sda_group.command(name="models")
    def list_models():
        """The GGUF files registered with llm sda register."""
        for name, path in registered_models().items():
            click.echo(f"sda-{name}: {path}")

    @sda_group.command(name="unregister")
    @click.argument("name")
    def unregister(name: str):
        """Forget a registered model."""
        models = registered_models()
        name = name[len("sda-"):] if name.startswith("sda-") and name not in models else name
        if name not in models:
            raise click.ClickException(f"no registered model {name!r}")
        _update_registry(lambda models: models.pop(name, None))


class SDAModel(llm.Model):
    can_stream = True

    class Options(llm.Options):
        align: Optional[str] = Field(None, description="Preset (helpfulness, harmlessness, honesty, empathy, "
                                                       "summarization) or an instruction sentence; none: plain")
        strength: Optional[float] = Field(None, ge=0, le=MAX_STRENGTH,
                                          description="Amplifier a (0 = prompting); absent: set by the judge")
        judge: Optional[str] = Field(None, description="auto (default), self, verify, local, local:PATH, none, openai[:MODEL]")
        temperature_mode: Optional[Literal["paper", "reference", "fixed"]] = None
        t0: Optional[float] = Field(None, ge=MIN_T0, le=MAX_T0, description="Base temperature T0 (0.6)")
        top_p: Optional[float] = Field(None, ge=MIN_TOP_P, le=1, description="Nucleus mass (0.95)")
        max_tokens: Optional[int] = Field(None, ge=1, le=32768, description="New tokens at most (512)")
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Sampling seed (default random)")
        n_ctx: Optional[int] = Field(None, ge=16, description="Context per stream (4096)")
        n_gpu_layers: Optional[int] = Field(None, ge=-1, description="Layers offloaded to a GPU (-1: all)")
        streams: Optional[Literal["batched", "contexts"]] = None
        cache_type_k: Optional[Literal["f16", "q8_0", "q4_0"]] = Field(None, description="KV cache type of K (f16)")
        cache_type_v: Optional[Literal["f16", "q8_0", "q4_0"]] = Field(
            None, description="KV cache type of V (f16; quantized needs flash attention)")
        flash_attn: Optional[Literal["auto", "on", "off"]] = Field(None, description="Flash attention (auto)")
        exact: Optional[Literal["auto", "on", "off"]] = Field(
            None, description="Batch-exact prompts (on: small ubatches) or llama.cpp's 512 (off); auto: on unless offloaded")
        steering: Optional[Literal["guarded", "paper"]] = Field(
            None, description="guarded (default: bounded, no echo) or paper (the paper's formula)")

        @field_validator("align", "judge")
        @classmethod
        def _not_blank(cls, value):
            if value is not None and not value.strip():
                raise ValueError("must not be empty")
            return value

    def __init__(self, model_id: str, model: Optional[str]):
        self.model_id = model_id
        self.model = model  # None (the default), a catalogue name or a GGUF path

    def __str__(self) -> str:
        return f"sda-local: {self.model_id}"

    def _engine(self, options: "SDAModel.Options"):
        from .engine import SDAEngine
        from .engine.layout import batch_policy

        key = (self.model, options.n_ctx or 4096, options.n_gpu_layers or 0, options.streams or "batched",
               options.cache_type_k or "f16", options.cache_type_v or "f16", options.flash_attn or "auto",
               batch_policy(options.exact, options.n_gpu_layers or 0).exact)  # what auto and the environment give
        with _engines_lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = SDAEngine(self.model, n_ctx=key[1], n_gpu_layers=key[2], streams=key[3],
                                                   cache_type_k=key[4], cache_type_v=key[5], flash_attn=key[6],
                                                   exact="on" if key[7] else "off")
        return engine

    def execute(self, prompt, stream, response, conversation):
        options = prompt.options
        try:
            yield from self._generate(prompt, response, conversation, options)
        except SDAError as exc:
            raise llm.ModelError(str(exc)) from None

    def _generate(self, prompt, response, conversation, options):
        from .pipeline import align_stream

        engine = self._engine(options)
        history = []
        for previous in (conversation.responses if conversation is not None else []):
            history.append((previous.prompt.prompt or "", previous.text_or_raise()))
        generation = {k: v for k, v in dict(max_tokens=options.max_tokens or 512, t0=options.t0,
                                             top_p=options.top_p, seed=options.seed,
                                             temperature_mode=options.temperature_mode).items() if v is not None}
        query = prompt.prompt or ""
        system = prompt.system or None  # llm passes "" when there is none
        align = options.align if options.align and options.align.strip().lower() != "none" else None
        if align is None:
            generation.pop("temperature_mode", None)
            run = engine.stream(query, None, system=system, history=history, **generation)
        else:
            from .engine.steering import DEFAULT_STEERING, PAPER

            steering = PAPER if options.steering == "paper" else DEFAULT_STEERING
            run = align_stream(engine, query, align, judge=options.judge or DEFAULT_JUDGE, strength=options.strength,
                               system=system, history=history, steering=steering, **generation)
        yield from run
        result = run.result
        stats = result.stats
        record = {"model": str(engine.model_path.name), "seed": stats.seed, "fusion_backend": stats.fusion_backend,
                  "mean_js": stats.mean_js, "mean_temperature": stats.mean_temperature,
                  "finish_reason": stats.finish_reason}
        if align is not None:
            record.update(align=align, amplifier=result.amplifier, amplifier_source=result.amplifier_source,
                          score=result.score, judge=result.judge, rubric_version=result.rubric_version)
        response.response_json = record
        response.set_usage(input=stats.prompt_tokens_with, output=stats.generated_tokens)
