"""``sda-local models`` (the catalogue) and ``sda-local info`` (versions, CPU, backends)."""

from __future__ import annotations

import json
import sys

import click

from .. import __version__
from .common import Group, main, offline_option, repack_option


@main.group(cls=Group)
def models():
    """The catalogue of named GGUF models and the local cache."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """List catalogue models and whether they are cached."""
    from .. import models as catalogue

    default = catalogue.default_model_name()
    rows = [
        {"name": m.name, "aliases": list(m.aliases), "default": m.name == default, "size_bytes": m.size,
         "licence": m.licence, "cached": m.is_cached(), "path": str(m.cached_path), "description": m.description}
        for m in catalogue.catalogue()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "cached" if r["cached"] else "not cached"
        click.echo(f"{mark} {r['name']:<24} {r['size_bytes'] / 1e6:6.0f} MB  {r['licence']:<18} {state:<10}  "
                   f"{r['description']}")


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch again even if cached.")
@offline_option
def models_pull(name, force):
    """Fetch a catalogue model into the cache (sha256 verified)."""
    from .. import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name), force=force))


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

    from .. import hardware, privacy
    from ..engine import native
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
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "native": lib is not None,
        "native_path": native.loaded_path(),
        "native_error": native.load_error(),
        "model_cache": str(catalogue.cache_dir()),
        "default_model": catalogue.default_model_name(),
        "offline": privacy.offline(),
        "conversation_log": str(log_path()),
        "cpu": hardware.cpu_report().to_dict(),
        "repack": hardware.repack_decision(),
        "system_info": system_info.strip(),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True)
@repack_option
@offline_option
def info(as_json):
    """Versions, compiled-in llama.cpp backends, CPU features and the repack decision, native hook, model cache."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = info_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
        click.echo(f"{key:>18}: {value}")
