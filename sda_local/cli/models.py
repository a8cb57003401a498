"""``sda-local models`` (the catalogue) and ``sda-local info`` (versions, CPU, backends)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import InputError
from .common import Group, kv_options, main, offline_option, repack_option, exact_option


@main.group(cls=Group)
def models():
    """The catalogue of named GGUF models and the local cache."""


@models.command("list")
@click.option("--all", "show_all", is_flag=True,
              help="Also the GGUFs of ollama, LM Studio and llama.cpp's cache found on this machine.")
@click.option("--json", "as_json", is_flag=True)
def models_list(show_all, as_json):
    """List catalogue models (cached or not), the models you pulled, and with --all those of other tools."""
    from .. import models as catalogue
    from ..models import stores

    default = catalogue.default_model_name()
    rows = [
        {"name": m.name, "kind": "catalogue", "aliases": list(m.aliases), "default": m.name == default,
         "size_bytes": m.size, "licence": m.licence, "cached": m.is_cached(), "path": str(m.cached_path),
         "description": m.description}
        for m in catalogue.catalogue()
    ]
    for name, record in sorted(catalogue.user_models().items()):
        rows.append({"name": name, "kind": "pulled", "default": False, "size_bytes": record.get("size", 0),
                     "cached": Path(record["path"]).is_file(), "path": record["path"],
                     "description": f"from {record.get('source', '?')}"})
    if show_all:
        for found in stores.discovered():
            rows.append({"name": found.spec, "kind": found.store, "default": False, "size_bytes": found.size,
                         "cached": True, "path": str(found.path), "description": f"{found.store}: {found.path}"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "cached" if r["cached"] else "not cached"
        click.echo(f"{mark} {r['name']:<24} {r['size_bytes'] / 1e6:6.0f} MB  {r.get('licence', r['kind']):<18} "
                   f"{state:<10}  {r['description']}")


@models.command("pull")
@click.argument("source")
@click.option("--name", default=None, help="Register a downloaded model under this name (default: the file name).")
@click.option("--sha256", default=None, help="Expected sha256 of a downloaded file.")
@click.option("--force", is_flag=True, help="Catalogue models: fetch again even if cached.")
@offline_option
def models_pull(source, name, sha256, force):
    """Fetch a catalogue model, or download a GGUF: URL or hf:ORG/REPO/FILE.gguf (resumable, verified)."""
    from .. import models as catalogue

    if "://" in source or source.startswith("hf:"):
        click.echo(catalogue.pull_source(source, name=name, sha256=sha256))
        return
    if name or sha256:
        raise InputError("--name and --sha256 apply to a URL or hf: download")
    click.echo(catalogue.pull(catalogue.lookup(source), force=force))


@models.command("path")
@click.argument("name")
@offline_option
def models_path(name):
    """Print the local path of a catalogue model (fetching it if needed)."""
    from .. import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name)))



def info_dict() -> dict:
    from importlib import metadata

    import llama_cpp

    from .. import privacy
    from ..models import hardware
    from ..engine import native
    from ..engine.llama import devices, supports_gpu_offload
    from .. import models as catalogue
    from ..logs import log_path

    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    backends = [seg.split(" : ")[0].strip() for seg in system_info.split(" | ") if " : " in seg]
    lib = native.library()
    return {
        "sda_local": __version__,
        "llama_cpp_python": metadata.version("llama-cpp-python"),
        "python": sys.version.split()[0],
        "llama_cpp_backends": backends,
        "gpu_offload": supports_gpu_offload(),
        "devices": [f"{name} ({kind})" for name, kind in devices()],
        "native": lib is not None,
        "native_path": native.loaded_path(),
        "native_simd": native.simd(),
        "native_error": native.load_error(),
        "model_cache": str(catalogue.cache_dir()),
        "default_model": catalogue.default_model_name(),
        "offline": privacy.offline(),
        "conversation_log": str(log_path()),
        "cpu": hardware.cpu_report().to_dict(),
        "repack": hardware.repack_decision(),
        "batches": _batches(),
        "system_info": system_info.strip(),
    }


def _batches() -> str:
    """The batch policy (--exact) on this build: on CPU, and with layers offloaded."""
    from ..engine.layout import batch_policy

    cpu, offloaded = batch_policy(None, 0), batch_policy(None, -1)
    if cpu == offloaded:
        return cpu.describe()
    return f"{cpu.describe()} on CPU; {offloaded.describe()} with layers offloaded (--exact)"


def kv_estimate(model, n_ctx: int, parallel: int) -> dict:
    """What the KV caches of ``serve --parallel P -c P*n_ctx`` (or any command at --n-ctx) take on ``model``,
    from its GGUF header alone (no weights are read; a catalogue name not yet fetched is fetched)."""
    from ..engine.kvcache import KVConfig, kv_memory
    from ..models.gguf import attention_shape_of
    from .. import models as catalogue
    from .common import kv_settings

    kv = kv_settings()
    config = KVConfig(kv.get("cache_type_k", "f16"), kv.get("cache_type_v", "f16"), kv.get("flash_attn", "auto")).check()
    memory = kv_memory(attention_shape_of(catalogue.resolve(model)), config, n_ctx=n_ctx, slots=parallel)
    return dict(memory.to_dict(), n_ctx=n_ctx, summary=memory.describe())


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", "-m", default=None, help="Also estimate the KV cache memory of this model (GGUF path or "
              "catalogue name) at --n-ctx and --parallel.")
@click.option("--n-ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context per stream.")
@click.option("--parallel", "-np", default=1, show_default=True, type=click.IntRange(1, 128), help="Slots.")
@kv_options[0]
@kv_options[1]
@kv_options[2]
@repack_option
@exact_option
@offline_option
def info(as_json, model, n_ctx, parallel):
    """Versions, compiled-in llama.cpp backends, CPU features and the repack decision, native hook, model cache;
    with --model, the KV cache memory a run of it takes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = info_dict()
    if model is not None:
        data["kv_cache"] = kv_estimate(model, n_ctx, parallel)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "kv_cache":
            value = value["summary"]
        elif isinstance(value, dict):
            value = "; ".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key:>18}: {value}")
