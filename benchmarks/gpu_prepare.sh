#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what benchmarks/gpu_check.sh needs on a lent GPU machine that has no
# network: run HERE, in the project's venv (the versions of its packages are the ones carried), with network
# to PyPI and the default catalogue model cached (or fetchable).
#
#   benchmarks/gpu_prepare.sh [--force]
#
#   .device/sdist/   llama-cpp-python's sdist, trimmed to what a CUDA build of the library needs (llama.cpp's
#                    vocab models, docs, tests, tools but mtmd, the other GPU backends and the sdist's .git
#                    left out: 77 MB -> about 5 MB)
#   .device/wheels/  Python 3.12 x86-64 wheels of what the machine's python lacks or has too old (diskcache,
#                    gguf, the server's fastapi/starlette/uvicorn/pydantic, the tests' openai SDK, ...)
#   .device/donor/   the vocab-only GGUF of SmolLM2 (tokenizer, special tokens, chat template; no tensors)
#
# It prints the size of each and of what travels in all (the working tree too), which must stay under the
# device's 64 MiB. --force makes everything again; otherwise what is there is kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV=$ROOT/.device
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
LIMIT_MIB=64
die() { echo "gpu_prepare: $*" >&2; exit 1; }

FORCE=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (usage: benchmarks/gpu_prepare.sh [--force])" ;;
    esac
done
command -v "$PY" >/dev/null || die "no $PY (activate the project's venv or set PYTHON)"
"$PY" -c 'import sda_local, gguf' 2>/dev/null || die "$PY cannot import sda_local and gguf: activate the project's venv (pip install gguf)"
git -C "$ROOT" check-ignore -q .device/x || die ".device/ is not git-ignored in $ROOT: it must not travel as part of the working tree"
mkdir -p "$DEV"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The wheels: what the GPU machine's python (3.12, PyTorch's image: numpy, scipy, click, requests, jinja2,
# pytest, prometheus-client, scikit-build-core, cmake, ninja, ... are there) lacks for llama-cpp-python
# (diskcache), synth_model.py (gguf), `sda-local serve` and the server tests (openai SDK), at the versions of
# this environment. Small pure-Python ones it has (typing-extensions, anyio, idna, h11, click) come too, at
# the versions these need, so that an older copy there cannot break them.
WHEELS=(diskcache gguf pydantic pydantic-core annotated-types typing-inspection typing-extensions
        fastapi starlette annotated-doc opentelemetry-api uvicorn
        openai httpx2 httpcore2 truststore jiter sniffio anyio h11 idna click)
# Installed on the GPU machine (/work/.library/device/KINDS.md): requirements met there need no wheel.
DEVICE_HAS="numpy scipy click requests jinja2 markupsafe typing-extensions pytest prometheus-client pyyaml tqdm
certifi charset-normalizer urllib3 idna h11 anyio httpx httpcore packaging pluggy iniconfig scikit-build-core
cmake ninja pathspec"

# ---------------------------------------------------------------------------------------------- the sdist
sdist_out=$DEV/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz
if [ "$FORCE" = 1 ] || [ ! -s "$sdist_out" ]; then
    echo "gpu_prepare: llama-cpp-python $LLAMA_VERSION sdist ..."
    "$PY" -m pip download -q --no-deps --no-binary=:all: --disable-pip-version-check -d "$TMP/dl" \
        "llama_cpp_python==$LLAMA_VERSION" >"$TMP/pip.log" 2>&1 || { tail -n 5 "$TMP/pip.log" >&2; die "pip download of the sdist failed"; }
    full=$(ls "$TMP"/dl/llama_cpp_python-$LLAMA_VERSION.tar.gz)
    mkdir -p "$TMP/x"
    tar -xzf "$full" -C "$TMP/x"
    top=$TMP/x/llama_cpp_python-$LLAMA_VERSION
    [ -f "$top/CMakeLists.txt" ] || die "unexpected sdist layout in $full"
    # Not built by `pip install` with -DLLAVA_BUILD=off: llama.cpp's tests, examples, tools (mtmd kept: the
    # default LLAVA_BUILD=on still builds), model vocabularies, docs, the other backends; nor the .git copies.
    (cd "$top" && rm -rf .git .github docs examples tests docker scripts)
    (cd "$top/vendor/llama.cpp" &&
        rm -rf .git .github .devops .gemini .pi models docs media benches tests examples pocs gguf-py conversion \
            scripts requirements ci skills app convert_*.py build-xcframework.sh &&
        find tools -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt -exec rm -rf {} + &&
        cd ggml/src && rm -rf ggml-sycl ggml-vulkan ggml-opencl ggml-hexagon ggml-metal ggml-cann ggml-webgpu \
            ggml-openvino ggml-et ggml-virtgpu ggml-zdnn ggml-zendnn ggml-musa ggml-hip ggml-rpc ggml-blas)
    [ -d "$top/vendor/llama.cpp/ggml/src/ggml-cuda" ] || die "the sdist has no ggml-cuda"
    mkdir -p "$DEV/sdist"
    rm -f "$DEV"/sdist/*.tar.gz
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$TMP/x" -czf "$sdist_out" \
        "llama_cpp_python-$LLAMA_VERSION"
    echo "gpu_prepare: sdist $(du -m "$full" | cut -f1) MB -> trimmed $(du -m "$sdist_out" | cut -f1) MB"
    {
        echo "llama_cpp_python-$LLAMA_VERSION.tar.gz: trimmed from PyPI's sdist, sha256 $(sha256sum "$full" | cut -d' ' -f1)"
    } >"$DEV/sdist/SOURCE.txt"
fi

# --------------------------------------------------------------------------------------------- the wheels
if [ "$FORCE" = 1 ] || ! ls "$DEV"/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_prepare: wheels for Python 3.12 x86-64 ..."
    pins=()
    for name in "${WHEELS[@]}"; do
        version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) ||
            die "$name is not installed in $PY: install sda-local's test extras first (pip install '.[test]')"
        pins+=("$name==$version")
    done
    rm -rf "$DEV/wheels"
    mkdir -p "$DEV/wheels"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEV/wheels" "${pins[@]}" >"$TMP/pip.log" 2>&1 ||
        { grep -v "is ignored" "$TMP/pip.log" | tail -n 5 >&2; die "pip download of the wheels failed"; }
    # Every requirement of every wheel (on Python 3.12, Linux, no extras) is a wheel here or on the machine.
    "$PY" - "$DEV/wheels" "$DEVICE_HAS" <<'EOF' || die "a carried wheel needs a package that neither travels nor is on the GPU machine (above)"
import re, sys, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = list(Path(sys.argv[1]).glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels} | {norm(n) for n in sys.argv[2].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "platform_python_implementation": "CPython", "implementation_name": "cpython",
       "os_name": "posix", "extra": ""}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in have:
                missing.append(f"{w.name}: {req}")
for m in missing:
    print("gpu_prepare: missing:", m, file=sys.stderr)
sys.exit(1 if missing else 0)
EOF
    echo "gpu_prepare: $(ls "$DEV"/wheels/*.whl | wc -l) wheels, $(du -sm "$DEV/wheels" | cut -f1) MB"
fi

# ---------------------------------------------------------------------------------------------- the donor
donor=$DEV/donor/smollm2-135m-instruct.vocab.gguf
if [ "$FORCE" = 1 ] || [ ! -s "$donor" ]; then
    echo "gpu_prepare: vocab-only donor from the catalogue's smollm2-135m-instruct ..."
    mkdir -p "$DEV/donor"
    "$PY" "$ROOT/benchmarks/synth_model.py" vocab "$donor" --donor smollm2-135m-instruct
fi

# ----------------------------------------------------------------------------------------------- the sizes
{
    echo "made by benchmarks/gpu_prepare.sh on $(date -u +%FT%TZ) at $(git -C "$ROOT" rev-parse --short HEAD)"
    cat "$DEV/sdist/SOURCE.txt" 2>/dev/null || true
    (cd "$DEV" && ls wheels/ donor/)
} >"$DEV/MANIFEST.txt"
bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -b 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(bytes "$DEV/sdist" "$DEV/wheels" "$DEV/donor" "$DEV/MANIFEST.txt")
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_prepare: .device/sdist $(mib "$(bytes "$DEV/sdist")"), .device/wheels $(mib "$(bytes "$DEV/wheels")"), .device/donor $(mib "$(bytes "$DEV/donor")")"
echo "gpu_prepare: working tree $(mib "$tree") + carried $(mib "$carried") = $(mib $((tree + carried))) of the device's $LIMIT_MIB MiB"
[ $((tree + carried)) -lt $((LIMIT_MIB * 1048576 * 9 / 10)) ] ||
    die "what travels is over 90% of the device's $LIMIT_MIB MiB limit"
echo "gpu_prepare: ready; on the GPU machine: benchmarks/gpu_check.sh build, then benchmarks/gpu_check.sh run, each with carry [\".device/sdist\", \".device/wheels\", \".device/donor\", \".device/MANIFEST.txt\"]"
