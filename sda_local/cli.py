"""The ``sda-local`` command line: a thin layer over the Python API (SDAEngine, models, batch)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .errors import InputError, SDAError
from .fusion import TEMPERATURE_MODES
from .streams import STREAM_MODES


class _Group(click.Group):
    """Every failure ends as one ``error: ...`` line and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SDAError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): nothing left to say
            sys.exit(1)
        except MemoryError:
            _fail("out of memory")
        except Exception as exc:  # an sda-local bug: still one line, with a way to get the traceback
            if os.environ.get("SDA_LOCAL_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set SDA_LOCAL_DEBUG=1 for a traceback)")


def _fail(message: str, code: int = 1):
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sda-local")
def main():
    """Training-free alignment of local GGUF models at inference time (SDA), inside llama.cpp."""


# ---------------------------------------------------------------------------------------------- generate
def _engine_options(f):
    options = [
        click.option("--model", "-m", default=None, help="GGUF path or catalogue name (default: the default model)."),
        click.option("--n-ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context per stream."),
        click.option("--threads", "n_threads", default=None, type=click.IntRange(1), help="CPU threads (default: all)."),
        click.option("--n-gpu-layers", default=0, show_default=True, type=int,
                     help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal."),
        click.option("--streams", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
                     help="batched: one context, two sequences; contexts: two contexts on the same weights."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    from .engine import SDAEngine

    return SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, streams=streams,
                     verbose=verbose)


def _decode_arg(name: str, value: Optional[str]) -> Optional[str]:
    """argv text that was not valid UTF-8 arrives with surrogate escapes: reject it clearly."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    return value


@main.command()
@click.argument("query", required=False)
@click.option("--align", "-a", default=None, help="Preset (helpfulness, harmlessness, honesty, empathy, "
              "summarization) or any instruction text. Without it: plain generation.")
@click.option("--strength", "-s", default=0.5, show_default=True, type=float, callback=_finite,
              help="Amplifier a (0 = prompting with the instruction).")
@click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1), help="Sampling seed (default: random).")
@click.option("--temperature-mode", type=click.Choice(list(TEMPERATURE_MODES)), default="paper", show_default=True)
@click.option("--t0", default=0.6, show_default=True, type=float, callback=_finite, help="Base temperature T0.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--system", default=None, help="System prompt (default: the preset's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, stats) instead of streaming.")
@click.option("--stats", "show_stats", is_flag=True, help="Print generation statistics to stderr.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL file of {query, id?, instruction?, strength?, seed?, max_tokens?, temperature_mode?}.")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None,
              help="Batch mode: JSONL results, appended line by line.")
@click.option("--resume", is_flag=True, help="Batch mode: skip ids already in --output.")
@_engine_options
def generate(query, align, strength, max_tokens, seed, temperature_mode, t0, top_p, system, as_json, show_stats,
             input_path, output_path, resume, model, n_ctx, n_threads, n_gpu_layers, streams, verbose):
    """Answer QUERY with SDA steering towards --align (streamed to stdout)."""
    query = _decode_arg("query", query)
    align = _decode_arg("--align", align)
    system = _decode_arg("--system", system)
    options = dict(strength=strength, max_tokens=max_tokens, t0=t0, top_p=top_p,
                   temperature_mode=temperature_mode, seed=seed, system=system)
    if input_path is not None or output_path is not None:
        if query is not None:
            raise InputError("give either a QUERY or --input/--output, not both")
        if input_path is None or output_path is None:
            raise InputError("batch mode needs both --input and --output")
        _generate_batch(input_path, output_path, resume, align, options,
                        (model, n_ctx, n_threads, n_gpu_layers, streams, verbose))
        return
    if query is None:
        raise InputError("missing QUERY (or use --input/--output for batch mode)")
    if not query.strip():
        raise InputError("query is empty")
    engine = _make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose)
    try:
        if as_json:
            result = engine.generate(query, align, **options)
            click.echo(json.dumps({"text": result.text, "stats": result.stats.to_dict()}, ensure_ascii=False))
        else:
            stream = engine.stream(query, align, **options)
            out = click.get_text_stream("stdout")
            for piece in stream:
                out.write(piece)
                out.flush()
            out.write("\n")
            result = stream.result
        if show_stats:
            _print_stats(result.stats)
    finally:
        engine.close()


def _print_stats(stats) -> None:
    line = (f"{stats.mode}: {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
            f"prefill {stats.prefill_seconds:.2f}s, finish={stats.finish_reason}")
    if stats.mode == "sda":
        line += (f", a={stats.strength:g}, mean T={stats.mean_temperature:.3f}, mean JS={stats.mean_js:.4f}, "
                 f"fusion {stats.fusion_us_per_token:.0f} us/token ({stats.fusion_backend}, {stats.streams})")
    click.echo(line, err=True)


def _generate_batch(input_path, output_path, resume, align, options, engine_args):
    from .batch import LINE_OPTIONS, run_batch

    if not input_path.is_file():
        raise InputError(f"input file not found: {input_path}")
    engine = _make_engine(*engine_args)

    def generate_one(job: dict) -> dict:
        line_options = dict(options)
        for key in LINE_OPTIONS[1:]:
            if key in job and job[key] is not None:
                line_options[key] = job[key]
        instruction = job["instruction"] if "instruction" in job else align
        if instruction is not None and not isinstance(instruction, str):
            raise InputError('"instruction" must be a string or null')
        result = engine.generate(job["query"], instruction, **line_options)
        return {"text": result.text, "stats": result.stats.to_dict()}

    try:
        report = run_batch(input_path, output_path, generate_one, resume=resume,
                           on_event=lambda msg: click.echo(msg, err=True))
    finally:
        engine.close()
    click.echo(f"{report.done} generated, {report.skipped} already done, {report.failed} failed "
               f"(of {report.total} lines) -> {output_path}", err=True)
    if report.failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- models
@main.group(cls=_Group)
def models():
    """The catalogue of named GGUF models and the local cache."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """List catalogue models and whether they are cached."""
    from . import models as catalogue

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
def models_pull(name, force):
    """Fetch a catalogue model into the cache (sha256 verified)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name), force=force))


@models.command("path")
@click.argument("name")
def models_path(name):
    """Print the local path of a catalogue model (fetching it if needed)."""
    from . import models as catalogue

    click.echo(catalogue.pull(catalogue.lookup(name)))


# ---------------------------------------------------------------------------------------------- info
def info_dict() -> dict:
    from importlib import metadata

    import llama_cpp

    from . import models as catalogue
    from . import native

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
        "system_info": system_info.strip(),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True)
def info(as_json):
    """Versions, compiled-in llama.cpp backends, native hook status, model cache."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = info_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:>18}: {value}")


# ---------------------------------------------------------------------------------------------- bench
@main.command()
@click.option("--model", "-m", default=None, help="GGUF path or catalogue name.")
@click.option("--threads", "n_threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(8))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(256))
@click.option("--json", "as_json", is_flag=True)
def bench(model, n_threads, tokens, runs, n_ctx, as_json):
    """Speed and memory of plain vs SDA generation (medians of --runs, arms interleaved)."""
    from .bench import format_report, run_bench

    report = run_bench(model, n_threads=n_threads, tokens=tokens, runs=runs, n_ctx=n_ctx,
                       progress=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    main()
