"""What every ``sda-local`` command shares: the group (one-line errors, crash reports), option callbacks,
the engine and judge options, and making engines and judges from them."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from typing import List, Optional

import click

from .. import __version__
from ..errors import InputError, SDAError
from ..engine.fusion import MAX_STRENGTH, MAX_T0, MIN_T0, MIN_TOP_P
from ..engine.layout import STREAM_MODES


class Group(click.Group):
    """Every failure ends as one ``error: ...`` line and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:  # bad option values, unknown options: one line, click's exit code 2
            where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            fail(f"{exc.format_message()}{where}", code=exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), code=exc.exit_code)
        except click.exceptions.Abort:
            fail("aborted", code=1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SDAError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): nothing left to say
            sys.exit(1)
        except MemoryError:
            fail("out of memory")
        except Exception as exc:  # an sda-local bug: still one line, the traceback goes to a crash report
            if os.environ.get("SDA_LOCAL_DEBUG"):
                raise
            report = write_crash_report(exc)
            where = f"crash report: {report}" if report else "set SDA_LOCAL_DEBUG=1 for a traceback"
            fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]} ({where})")


def write_crash_report(exc: BaseException) -> Optional[str]:
    """The traceback, versions and command line in an owner-only file under the state directory (it may
    quote the user's text); its path, or None when it cannot be written."""
    import time
    import traceback

    from ..privacy import private_dir, state_dir, write_private_text

    try:
        folder = private_dir(state_dir() / "crash-reports")
        path = folder / time.strftime(f"crash-%Y%m%d-%H%M%S-{os.getpid()}.txt")
        body = (f"sda-local {__version__}, Python {sys.version.split()[0]}, {sys.platform}\n"
                f"argv: {redact_argv(sys.argv)!r}\n\n"
                + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        write_private_text(path, redact_secrets(body, sys.argv))
        return str(path)
    except Exception:
        return None


# Options and environment variables whose values are credentials: never written to a crash report.
_SECRET_OPTION = re.compile(r"^--?(?:\w+-)*(?:key|token|secret|password|passwd)$", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "OPENAI_API_KEY", "SDA_JUDGE_API_KEY", "SDA_LOCAL_API_KEY")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
REDACTED = "<redacted>"


def redact_argv(argv: List[str]) -> List[str]:
    """``argv`` with the values of credential options (--api-key X, --api-key=X) and URL passwords hidden."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if _SECRET_OPTION.match(name):
            if eq:
                arg = f"{name}={REDACTED}"
            else:
                hide_next = True
        out.append(_URL_CREDENTIALS.sub(f"{REDACTED}@", arg))
    return out


def redact_secrets(text: str, argv: List[str]) -> str:
    """``text`` with every credential value of ``argv`` and of SECRET_ENV replaced (a traceback may quote one)."""
    secrets = {os.environ.get(name) for name in SECRET_ENV}
    for original, shown in zip(argv, redact_argv(argv)):
        if original != shown:
            name, eq, value = original.partition("=")
            secrets.add(value if eq and _SECRET_OPTION.match(name) else original)
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _URL_CREDENTIALS.sub(f"{REDACTED}@", text)


def fail(message: str, code: int = 1):
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


def seed_callback(ctx, param, value):
    # An InputError, not click's usage error: one line, and raised while parsing, before any model loads.
    from ..seeds import check_seed

    return None if value is None else check_seed(value, "--seed")


def finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def in_range(low: float, high: float, why: str = ""):
    """A callback that checks a float option before any model is loaded (finite, low <= value <= high)."""

    def check(ctx, param, value):
        value = finite(ctx, param, value)
        if value is not None and not low <= value <= high:
            raise click.BadParameter(f"must be in [{low:g}, {high:g}]{why}, got {value:g}")
        return value

    return check


strength_range = in_range(0.0, MAX_STRENGTH, " (the paper's amplifier is in [0, 1])")
t0_range = in_range(MIN_T0, MAX_T0)


def verify_strength(ctx, param, value):
    if value is None or value.strip().lower() == "judge":
        return "judge" if value is not None else None
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"must be a number or judge, got {value!r}") from None
    return strength_range(ctx, param, number)
top_p_range = in_range(MIN_TOP_P, 1.0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sda-local")
def main():
    """Training-free alignment of local GGUF models at inference time (SDA), inside llama.cpp."""



STEERING_OPTIONS = ("steering_mode", "steering_clip", "echo_run", "plausibility", "guard_to", "instruction_parts",
                    "cap_directive", "onset")


def steering_options(f):
    """--steering and its options, given to the command as one ``steering`` argument (a Steering)."""
    from ..engine.steering import DEFAULT_STEERING, GUARD_TARGETS, STEERING_MODES

    options = [
        click.option("--steering", "steering_mode", type=click.Choice(STEERING_MODES), default=DEFAULT_STEERING.mode,
                     show_default=True, help="paper: the paper's formula exactly; guarded: steering that does not "
                     "reward copying the instruction (README, Steering without echo)."),
        click.option("--steering-clip", default=None, type=click.FloatRange(0), help="guarded: bound c on "
                     f"|l_with - l_without| (0 = none; default {DEFAULT_STEERING.clip:g})."),
        click.option("--echo-run", default=None, type=click.IntRange(0, 64), help="guarded: instruction runs of "
                     f"this many tokens get no steering (0 = no guard; default {DEFAULT_STEERING.echo_run})."),
        click.option("--guard-to", default=None, type=click.Choice(GUARD_TARGETS), help="guarded: what a guarded "
                     "token gets: 'without' its without-instruction log-prob, 'prompt' no more than prompting "
                     f"gives it (default {DEFAULT_STEERING.guard_to})."),
        click.option("--plausibility", default=None, type=click.FloatRange(0, 1, max_open=True),
                     help=f"guarded: drop tokens below this share of the top with-instruction probability "
                     f"(default {DEFAULT_STEERING.plausibility:g})."),
        click.option("--instruction-parts/--no-instruction-parts", "instruction_parts", default=None,
                     help="guarded: read the instruction's parts: quoted text and symbols it asks for are never "
                     "guarded, words it forbids (do not, never, avoid ...) get no more than either stream gives "
                     f"them (default {'on' if DEFAULT_STEERING.parts else 'off'})."),
        click.option("--cap-directive/--no-cap-directive", "cap_directive", default=None,
                     help="guarded, with the parts: the instruction's own words are never amplified beyond "
                     f"prompting (default {'on' if DEFAULT_STEERING.cap else 'off'})."),
        click.option("--onset", default=None, type=click.IntRange(0, 4096), help="guarded: the answer's first N "
                     f"tokens are not steered (prompting's), so it starts on the query (default {DEFAULT_STEERING.onset})."),
    ]

    @functools.wraps(f)
    def command(*args, **kwargs):
        kwargs["steering"] = steering_from_cli(**{name: kwargs.pop(name) for name in STEERING_OPTIONS})
        return f(*args, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def steering_from_cli(steering_mode: str, steering_clip=None, echo_run=None, plausibility=None, guard_to=None,
                      instruction_parts=None, cap_directive=None, onset=None):
    """The Steering of the command line: the default's values where an option is not given."""
    from ..engine.steering import DEFAULT_STEERING, PAPER, Steering

    given = dict(clip=steering_clip, echo_run=echo_run, plausibility=plausibility, guard_to=guard_to,
                 parts=instruction_parts, cap=cap_directive, onset=onset)
    if steering_mode == "paper":
        if any(v is not None for v in given.values()):
            raise InputError("--steering-clip, --echo-run, --plausibility, --guard-to, --instruction-parts, "
                             "--cap-directive and --onset apply to --steering guarded")
        return PAPER
    base = DEFAULT_STEERING if DEFAULT_STEERING.mode == "guarded" else Steering("guarded")
    fields = {**base.to_dict(), **{k: v for k, v in given.items() if v is not None}}
    if instruction_parts is False and cap_directive is None:
        fields["cap"] = False  # the cap reads the parts: --no-instruction-parts turns it off too
    return Steering(**fields).check()


def engine_options(f):
    options = [
        click.option("--model", "-m", default=None, help="GGUF path or catalogue name (default: the default model)."),
        click.option("--n-ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context per stream."),
        click.option("--threads", "n_threads", default=None, type=click.IntRange(1), help="CPU threads (default: all)."),
        click.option("--n-gpu-layers", default=0, show_default=True, type=int,
                     help="Layers to offload to the GPU (-1: all) when llama-cpp-python was built with CUDA/Metal."),
        click.option("--streams", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
                     help="batched: one context, two sequences; contexts: two contexts on the same weights."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
        *kv_options,
        repack_option,
        exact_option,
        offline_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _store_kv(ctx, param, value):
    """The KV cache options reach make_engine through the click context (every command that loads a model
    has them, and none needs them itself)."""
    from click.core import ParameterSource

    ctx.meta.setdefault("sda_kv", {})[param.name] = value
    if ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
        ctx.meta.setdefault("sda_kv_given", set()).add(param.name)
    return value


def kv_given() -> set:
    """The KV cache options the user gave on the command line (not left at their defaults)."""
    ctx = click.get_current_context(silent=True)
    return set(ctx.meta.get("sda_kv_given", ())) if ctx is not None else set()


# llama.cpp's names and choices; engine/kvcache.py
kv_options = [
    click.option("--cache-type-k", "-ctk", "cache_type_k", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16",
                 show_default=True, expose_value=False, callback=_store_kv, help="KV cache type of K."),
    click.option("--cache-type-v", "-ctv", "cache_type_v", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16",
                 show_default=True, expose_value=False, callback=_store_kv,
                 help="KV cache type of V (quantized: needs flash attention)."),
    click.option("--flash-attn", "-fa", "flash_attn", type=click.Choice(["auto", "on", "off"]), default="auto",
                 show_default=True, expose_value=False, callback=_store_kv, help="Flash attention, as llama.cpp's."),
]


def kv_settings() -> dict:
    """--cache-type-k/-v and --flash-attn of the running command (SDAEngine's keyword arguments)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get("sda_kv", {})) if ctx is not None else {}


def set_repack(ctx, param, value):
    """--repack applies to every model this process (and its bench workers) loads: it sets SDA_LOCAL_REPACK."""
    from ..models.hardware import REPACK_ENV

    if value is not None:
        os.environ[REPACK_ENV] = value
    return value


def set_exact(ctx, param, value):
    """--exact applies to every engine this process (and its bench workers) makes: it sets SDA_LOCAL_EXACT."""
    from ..engine.layout import EXACT_ENV

    if value is not None:
        os.environ[EXACT_ENV] = value
    return value


def set_offline(ctx, param, value):
    """--offline applies to the whole process: it sets SDA_LOCAL_OFFLINE, which every network path checks."""
    from ..privacy import OFFLINE_ENV

    if value:
        os.environ[OFFLINE_ENV] = "1"
    return value


offline_option = click.option(
    "--offline", is_flag=True, expose_value=False, is_eager=True, callback=set_offline,
    help="Refuse any network use (a model that is not cached, a remote judge); same as SDA_LOCAL_OFFLINE=1.")

repack_option = click.option(
    "--repack", type=click.Choice(["auto", "on", "off"]), default=None, expose_value=False, is_eager=True,
    callback=set_repack,
    help="llama.cpp weight repacking (extra buffer types). auto (default, or $SDA_LOCAL_REPACK): off on Intel AMX "
         "CPUs, whose AMX kernels crash in this llama.cpp, on elsewhere.")


exact_option = click.option(
    "--exact", type=click.Choice(["auto", "on", "off"]), default=None, expose_value=False, is_eager=True,
    callback=set_exact,
    help="on: prompts go through llama.cpp in ubatches of 32 rows (16 where the build has a GPU or BLAS "
         "backend), so each row's logits do not depend on the "
         "batch (bit-exact on CPU: a = 0 is exactly prompting, reused caches and concurrent requests change "
         "nothing), at a prefill cost; off: llama.cpp's usual ubatch of 512. auto (default, or $SDA_LOCAL_EXACT): "
         "on unless layers are offloaded to a GPU.")


def judge_options(f):
    from ..amplifier import AMPLIFIER_MAPS, DEFAULT_MAP
    from ..judging import SCORINGS

    options = [
        click.option("--judge", "-j", default=None,
                     help="Who sets the amplifier from the first answer: auto (default: verify where a program "
                          "can check the whole instruction, else self), self (no judge: the model's likelihood "
                          "ratio with and without the instruction), verify (a program checks the answer prompted "
                          "with the instruction: a = 0 if it complies), local (this model scores it under a "
                          "rubric), local:PATH|NAME, openai[:MODEL] (default gpt-4.1), none (fixed a = 0.5)."),
        click.option("--judge-scoring", type=click.Choice(list(SCORINGS)), expose_value=False,
                     callback=store_judge_option("scoring"),
                     help="How a local judge scores: expected (the mean of its score distribution; default) or "
                          "greedy (its most likely score)."),
        click.option("--judge-url", default=None,
                     help="OpenAI-compatible base URL for the judge (llama-server, ollama, vLLM, ...); "
                          "key from SDA_JUDGE_API_KEY or OPENAI_API_KEY, or user:pass@ in the URL (HTTP Basic, "
                          "never shown)."),
        click.option("--amplifier-map", type=click.Choice(list(AMPLIFIER_MAPS)), default=DEFAULT_MAP,
                     show_default=True, help="Score -> amplifier map (sigmoid: the paper's Eq. 3)."),
        # Not parameters of the commands: collected into ctx.meta for judge_from_cli (see remote_judge_options).
        click.option("--judge-timeout", type=click.FloatRange(0, min_open=True), expose_value=False,
                     callback=store_judge_option("read_timeout"),
                     help="Seconds a remote judge may stay silent before the attempt fails (default 120)."),
        click.option("--judge-retries", type=click.IntRange(1), expose_value=False,
                     callback=store_judge_option("max_attempts"),
                     help="Attempts per judgement, the first included; HTTP 429/5xx, timeouts and dropped "
                          "connections are retried (default 4)."),
        click.option("--judge-max-wait", type=click.FloatRange(0), expose_value=False,
                     callback=store_judge_option("max_wait"),
                     help="Longest pause between attempts a server may ask for with Retry-After; a longer "
                          "one fails at once (default 60 s)."),
        click.option("--allow-insecure-judge", is_flag=True, expose_value=False,
                     callback=store_judge_option("allow_insecure"),
                     help="Send the API key over plain http:// to a host other than this machine (refused "
                          "otherwise)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


JUDGE_META = "sda_local.remote_judge_options"


def store_judge_option(name: str):
    def store(ctx, param, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, got {value}")
        if value is not None and value is not False:
            ctx.meta.setdefault(JUDGE_META, {})[name] = value
        return value

    return store


def remote_judge_options() -> dict:
    """The --judge-scoring/--judge-timeout/--judge-retries/--judge-max-wait/--allow-insecure-judge given on
    this command line, as make_judge options (absent: the judge's defaults)."""
    return dict(click.get_current_context().meta.get(JUDGE_META, {}))


def is_remote(judge_spec) -> bool:
    from ..judging import parse_judge_spec

    return parse_judge_spec(*judge_spec)[0] == "openai"


def make_engine(model, n_ctx, n_threads, n_gpu_layers, streams, verbose, parallel=1, kv=None):
    """``kv``: the KV cache settings to use in place of the command line's (a resumed eval run's)."""
    from ..engine import SDAEngine

    engine = SDAEngine(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, streams=streams,
                       verbose=verbose, parallel=parallel, **(kv if kv is not None else kv_settings()))
    for notice in engine.notices:
        click.echo(f"note: {notice}", err=True)
    return engine


def decode_arg(name: str, value: Optional[str]) -> Optional[str]:
    """argv text that was not valid UTF-8 arrives with surrogate escapes: reject it clearly."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    return value



def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def report_judgement(judgement, a: float) -> None:
    click.echo(f"judge {judgement.judge}: score {judgement.shown()} ({judgement.rubric_version}) -> a = {a:.3f}",
               err=True)


def judge_from_cli(judge_spec, engine, *, needed: bool = True, options: Optional[dict] = None):
    """The judge of --judge/--judge-url (None when not needed or "none"); a remote one announces itself.
    ``options``: make_judge's remote options (default: those on the command line)."""
    from ..judging import RemoteJudge, make_judge

    spec, url = judge_spec
    if not needed:
        return None
    judge = make_judge(spec, engine, url=url, **(remote_judge_options() if options is None else options))
    if isinstance(judge, RemoteJudge):
        click.echo(f"sda-local: answers are sent to {judge.url} for judging", err=True)
    return judge


def print_stats(stats) -> None:
    line = (f"{stats.mode}: {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
            f"prefill {stats.prefill_seconds:.2f}s, finish={stats.finish_reason}")
    if stats.mode == "sda":
        line += (f", a={stats.strength:g}, mean T={stats.mean_temperature:.3f}, mean JS={stats.mean_js:.4f}, "
                 f"fusion {stats.fusion_us_per_token:.0f} us/token ({stats.fusion_backend}, {stats.streams})")
    click.echo(line, err=True)
