#!/usr/bin/env bash
# The GPU check (issue 23): llama-cpp-python built with CUDA, sda-local against it, the engine, fusion,
# sampler, scheduler and server tests and `sda-local bench` / `bench --serve` with every layer offloaded, on
# synthetic models at real sizes (benchmarks/synth_model.py). Made for a lent GPU machine (one H100/H200, 16
# cores, nvcc, python3 3.12, no network): what it needs travels in .device/, filled here by
# benchmarks/gpu_prepare.sh. Everything it prints goes to $OUT/gpu_check.log, the key numbers to
# $OUT/gpu_check_summary.txt and the bench reports to $OUT/gpu_check_results.json.
#
#   benchmarks/gpu_check.sh [--cpu] [PHASE ...]
#
# PHASE (default: all), each doing first what it needs and is not there yet, and keeping what an earlier call
# on the same (still warm) machine finished: the build, the models, the test and bench results. So the same
# command, called again at once, goes on where the time limit stopped the last one.
#   build   llama-cpp-python from .device/sdist with CUDA for this GPU's architecture (CUDA_ARCHITECTURES from
#           nvidia-smi) into .device/work/venv, and sda-local into the same venv. A build found there (a second
#           call on a still warm machine) is kept only if llama.cpp reports GPU offload.
#   models  the synthetic models of GPU_CHECK_SHAPES (llama-1b smollm2-135m) in .device/work/models, with the
#           tokenizer of the vocab-only donor in .device/donor
#   test    the engine, fusion, sampler, scheduler and server tests, -ngl 99, on the smollm2-135m shape with
#           an untied output matrix (a tied random model repeats its input token, which no seed, instruction
#           or batching changes; untied, they show in the tokens)
#   bench   sda-local bench and bench --serve on each shape, -ngl 99
#   run     models test bench (in the order: models, the first shape's benches, tests, the other benches)
#   big     the llama-8b shape (Q4_K_M, 15 GB of F16 written and quantized first) and its benches
#   all     build run
#
# --cpu: no CUDA build; the python3 on PATH (or $PYTHON) and the sda-local installed there are used as they
# are, -ngl 0, a few tokens, the smollm2-135m shape: everything but the GPU, on any machine.
#
# Without a GPU and nvcc (and without --cpu) it says so in one line and exits 0: nothing to check here.
# Exit codes: 0 all ran and the tests passed (benchmark targets are reported, not enforced); 1 a step failed
# (one line says which; its output is in the log); 2 bad arguments.
#
# Environment: OUT (default .device/work/out), PYTHON (default python3), GPU_CHECK_SHAPES, GPU_CHECK_TOKENS
# (GPU 128, CPU 16), GPU_CHECK_RUNS (GPU 2, CPU 1), GPU_CHECK_THREADS (GPU 8, CPU 2), GPU_CHECK_NGL (GPU 99),
# GPU_CHECK_BUDGET (seconds for this call, default 570 on a GPU, none with --cpu: steps that would start later
# are skipped and said so), GPU_CHECK_TESTS (the test files), GPU_CHECK_PYTEST_ARGS (more pytest arguments),
# GPU_CHECK_CUDA_ARCH (instead of nvidia-smi's), GPU_CHECK_FA=off (no flash-attention CUDA kernels: about half
# the build's compile time, and llama.cpp then runs attention without them), GPU_CHECK_FRESH=1 (forget the test
# and bench results of earlier calls; the default with --cpu), GPU_CHECK_FORCE_BUILD=1 (build with nvcc where
# no GPU is: a rehearsal of the build; nothing runs on a GPU then).
set -eEuo pipefail
# Whatever fails unexpectedly still ends in one line (inner subshells stay quiet: their caller says it).
trap 'rc=$?; [ "$BASH_SUBSHELL" = 0 ] && echo "gpu_check: unexpected failure (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit 1' ERR

# (GPU_CHECK_ROOT: the checkout, for a copy of this script run from elsewhere while this one is edited.)
ROOT=${GPU_CHECK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DEV=$ROOT/.device
WORK=$DEV/work
LLAMA_VERSION=0.3.36
STARTED=$SECONDS

die() { echo "gpu_check: $*" >&2; exit 1; }
usage() { echo "gpu_check: $*; usage: benchmarks/gpu_check.sh [--cpu] [build|models|test|bench|run|big|all ...]" >&2; exit 2; }

CPU=0
PHASES=()
for arg in "$@"; do
    case $arg in
        --cpu) CPU=1 ;;
        build|models|test|bench|run|big|all) PHASES+=("$arg") ;;
        -h|--help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage "unknown argument '$arg'" ;;
    esac
done
[ ${#PHASES[@]} -gt 0 ] || PHASES=(all)
want() {  # want PHASE: was it asked for (directly or through run/all)?
    local p
    for p in "${PHASES[@]}"; do
        case "$1:$p" in
            "$p:$p"|build:all|models:run|models:all|test:run|test:all|bench:run|bench:all) return 0 ;;
        esac
    done
    return 1
}

# ------------------------------------------------------------------------------------------- where we are
find_nvcc() {
    if [ -n "${GPU_CHECK_NVCC:-}" ]; then [ -x "$GPU_CHECK_NVCC" ] && echo "$GPU_CHECK_NVCC"; return 0; fi
    command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true
}
find_smi() {
    if [ -n "${GPU_CHECK_NVIDIA_SMI:-}" ]; then [ -x "$GPU_CHECK_NVIDIA_SMI" ] && echo "$GPU_CHECK_NVIDIA_SMI"; return 0; fi
    command -v nvidia-smi || true
}
if [ "$CPU" = 0 ]; then
    NVCC=$(find_nvcc)
    SMI=$(find_smi)
    GPU_NAME=
    [ -n "$SMI" ] && GPU_NAME=$("$SMI" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
    if [ -z "$NVCC" ] || { [ -z "$GPU_NAME" ] && [ "${GPU_CHECK_FORCE_BUILD:-0}" != 1 ]; }; then
        echo "gpu_check: no NVIDIA GPU with nvcc here (nvidia-smi: ${SMI:-none}, GPU: ${GPU_NAME:-none}, nvcc: ${NVCC:-none}): CUDA build and GPU runs skipped; --cpu checks the rest on CPU"
        exit 0
    fi
fi

OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check_summary.txt
RESULTS=$WORK/results
mkdir -p "$RESULTS"
: >"$SUMMARY"
: >"$LOG"
rm -f "$OUT/gpu_check_results.json"
exec 3>>"$LOG"  # the log, whatever stdout is

say() { echo "$*"; echo "$*" >&3; }
note() { echo "$*" >>"$SUMMARY"; echo "$*" >&3; }
FAILED=()

if [ "$CPU" = 1 ]; then
    BUDGET=${GPU_CHECK_BUDGET:-0}
    NGL=${GPU_CHECK_NGL:-0}
    TOKENS=${GPU_CHECK_TOKENS:-16}
    RUNS=${GPU_CHECK_RUNS:-1}
    THREADS=${GPU_CHECK_THREADS:-2}
    SHAPES=${GPU_CHECK_SHAPES:-smollm2-135m}
    FRESH=${GPU_CHECK_FRESH:-1}
else
    BUDGET=${GPU_CHECK_BUDGET:-570}
    NGL=${GPU_CHECK_NGL:-99}
    TOKENS=${GPU_CHECK_TOKENS:-128}
    RUNS=${GPU_CHECK_RUNS:-2}
    THREADS=${GPU_CHECK_THREADS:-8}
    SHAPES=${GPU_CHECK_SHAPES:-llama-1b smollm2-135m}  # the target shape first
    FRESH=${GPU_CHECK_FRESH:-0}
fi
[ "$FRESH" = 0 ] || rm -f "$RESULTS"/*
# Results kept from an earlier call hold only for the same code: a changed tree forgets them.
TREE=$(cd "$ROOT" && find sda_local native tests benchmarks -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.hpp' \
    -o -name '*.h' -o -name '*.sh' -o -name 'CMakeLists.txt' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [ -f "$RESULTS/tree.txt" ] && [ "$(cat "$RESULTS/tree.txt")" != "$TREE" ]; then
    rm -f "$RESULTS"/*
fi
echo "$TREE" >"$RESULTS/tree.txt"
TEST_FILES=${GPU_CHECK_TESTS:-tests/test_engine.py tests/test_fusion.py tests/test_sda_sampler.py tests/test_nucleus.py tests/test_scheduler.py tests/test_server.py}
# Tests that read the real SmolLM2's text or name (an answer that ends, a digit it writes, a judge's score, its
# file name): the synthetic model has its size and tokenizer but random weights, so these cannot pass on it.
CONTENT_TESTS=(
    "tests/test_engine.py::test_plain_generation_stops_at_end_of_generation"
    "tests/test_scheduler.py::test_stop_strings_end_the_answer_and_are_not_shown"
    "tests/test_server.py::test_health_and_models"
    "tests/test_server.py::test_the_full_pipeline_sets_the_amplifier_with_the_server_judge"
)
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1  # import the installed sda_local, never the checkout's (no libsda)
export SDA_LOCAL_OFFLINE=1                  # nothing is fetched: the machine has no network

left() {  # seconds left of the budget (a large number without one)
    if [ "$BUDGET" -gt 0 ]; then echo $((BUDGET - (SECONDS - STARTED))); else echo 100000; fi
}

output_of() {  # the log's lines of the last step named $1
    awk -v mark="----- $1: " 'index($0, mark) == 1 {buf = ""; on = 1; next} /^----- / {on = 0} on {buf = buf $0 "\n"} END {printf "%s", buf}' "$LOG"
}

# step NAME MIN_SECONDS COMMAND...: run COMMAND with its output in the log, within the budget (skipped when
# fewer than MIN_SECONDS are left, stopped when none are); records its time and, in FAILED, a failure or a
# skip (then SKIPPED=1). Returns COMMAND's status (1 when skipped).
SKIPPED=0
step() {
    local name=$1 need=$2 t0 rc=0 budget
    shift 2
    budget=$(left)
    SKIPPED=0
    if [ "$budget" -lt "$need" ]; then
        SKIPPED=1
        say "[$(date +%T)] $name: skipped, ${budget}s of the budget left (needs about ${need}s)"
        note "$name: skipped (out of time)"
        FAILED+=("$name (out of time)")
        return 1
    fi
    say "[$(date +%T)] $name ..."
    echo "----- $name: $*" >&3
    t0=$SECONDS
    if [ "$(type -t "$1")" = function ]; then
        "$@" >&3 2>&1 || rc=$?
    else
        timeout --kill-after=10 "$budget" "$@" >&3 2>&1 || rc=$?
    fi
    if [ "$rc" = 0 ]; then
        say "[$(date +%T)] $name: done in $((SECONDS - t0))s"
    else
        FAILED+=("$name")
        local tail_lines
        tail_lines=$(output_of "$name" | tail -n 15 | sed 's/^/    /')
        [ "$rc" = 124 ] && say "[$(date +%T)] $name: stopped at the end of the budget after $((SECONDS - t0))s"
        say "[$(date +%T)] $name: FAILED (exit $rc) after $((SECONDS - t0))s; the end of its output:"
        echo "$tail_lines"
    fi
    note "$name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0))s"
    return "$rc"
}

say "gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-this machine}: $( [ "$CPU" = 1 ] && echo "CPU mode" || echo "${GPU_NAME:-no GPU (build rehearsal)}"), $(nproc) cores, phases: ${PHASES[*]}"
note "gpu_check $( [ "$CPU" = 1 ] && echo "--cpu" || echo "${GPU_NAME:-build rehearsal}, flash-attention kernels ${GPU_CHECK_FA:-on}"), phases ${PHASES[*]}, shapes: $SHAPES, -ngl $NGL, $THREADS threads, $TOKENS tokens, $RUNS runs"
[ -f "$DEV/MANIFEST.txt" ] && { echo "----- .device/MANIFEST.txt" >&3; cat "$DEV/MANIFEST.txt" >&3; }

# ------------------------------------------------------------------------------------------------- build
PYBASE=${PYTHON:-python3}
command -v "$PYBASE" >/dev/null || die "no $PYBASE here (set PYTHON)"
VENV=$WORK/venv
if [ "$CPU" = 1 ]; then
    PY=$(command -v "$PYBASE")
else
    PY=$VENV/bin/python
fi

cuda_env() {
    # The CUDA toolkit beside nvcc; cuBLAS from it, else from the nvidia-cublas wheel that PyTorch brought (a
    # toolkit made of pip wheels has no cuBLAS). Sets CUDA_CMAKE_ARGS and the library path for build and runs.
    local lib inc found candidate
    # nvcc may be a wrapper script (/usr/local/bin/nvcc here): the toolkit is the first of these with headers.
    CUDA_HOME_FOUND=
    for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)" \
        /usr/local/cuda; do
        if [ -n "$candidate" ] && { [ -e "$candidate/include/cuda_runtime.h" ] ||
            compgen -G "$candidate/targets/*/include/cuda_runtime.h" >/dev/null; }; then
            CUDA_HOME_FOUND=$candidate
            break
        fi
    done
    [ -n "$CUDA_HOME_FOUND" ] || die "no CUDA toolkit headers (cuda_runtime.h) beside $NVCC, in \$CUDA_HOME or /usr/local/cuda"
    CUDA_HOME=$CUDA_HOME_FOUND
    CUDA_CMAKE_ARGS=
    found=$(ls "$CUDA_HOME"/lib64/libcublas.so "$CUDA_HOME"/targets/*/lib/libcublas.so 2>/dev/null | head -n 1 || true)
    if [ -z "$found" ]; then
        found=$("$PYBASE" -c '
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
hits = [p for r in roots for p in sorted(glob.glob(os.path.join(r, "cu*", "lib", "libcublas.so.*")))
        + sorted(glob.glob(os.path.join(r, "cublas", "lib", "libcublas.so.*")))]
print(hits[0] if hits else "")' 2>/dev/null || true)
        [ -n "$found" ] || die "no cuBLAS: neither in $CUDA_HOME nor in an nvidia-cublas wheel of $PYBASE"
        lib=$(dirname "$found")
        inc=$(cd "$lib/../include" && pwd)
        local lt
        lt=$(ls "$lib"/libcublasLt.so.* | head -n 1)
        CUDA_CMAKE_ARGS="-DCUDA_cublas_LIBRARY=$found -DCUDA_cublasLt_LIBRARY=$lt"
        export CPATH=$inc${CPATH:+:$CPATH}
        export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export LIBRARY_PATH=$lib${LIBRARY_PATH:+:$LIBRARY_PATH}
    fi
    # The driver's libcuda for the CUDA VMM pool (FindCUDAToolkit looks only beside nvcc, for a stub); where
    # there is none (no driver: a build rehearsal), the pool without VMM.
    local drv
    drv=$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so(\.1)? / {print $NF; exit}')
    [ -n "$drv" ] || drv=$(ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/targets/*/lib/stubs/libcuda.so \
        /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so* 2>/dev/null |
        head -n 1 || true)
    if [ -n "$drv" ]; then
        CUDA_CMAKE_ARGS="$CUDA_CMAKE_ARGS -DCUDA_cuda_driver_LIBRARY=$drv"
    else
        CUDA_CMAKE_ARGS="$CUDA_CMAKE_ARGS -DGGML_CUDA_NO_VMM=ON"
    fi
    for lib in "$CUDA_HOME"/targets/*/lib "$CUDA_HOME"/lib64; do
        [ -d "$lib" ] && export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH CUDACXX=$NVCC
    echo "CUDA: nvcc $NVCC, toolkit $CUDA_HOME, $("$NVCC" --version | tail -n 2 | head -n 1), cmake: $CUDA_CMAKE_ARGS" >&3
}

# Is the llama-cpp-python in the venv a CUDA build (and, on a GPU, does llama.cpp offload)?
cuda_build_ok() {
    [ -x "$PY" ] || return 1
    ls "$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))' 2>/dev/null)"/lib/libggml-cuda.so* >/dev/null 2>&1 || return 1
    [ -z "$GPU_NAME" ] && return 0  # a build rehearsal: no GPU to offload to
    "$PY" -c 'import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' >&3 2>&1
}

make_venv() {
    # A venv of its own that sees the base python's packages (numpy, scipy, pytest, ...) after its own, so the
    # carried wheels (newer pydantic, ...) win, and sda-local's tests find sda-local beside sys.executable.
    # (Run by step, in an || list where set -e does not hold: every command is checked.)
    local base site
    rm -rf "$VENV" && "$PYBASE" -m venv --without-pip "$VENV" || return 1
    base=$("$PYBASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    echo "import site; site.addsitedir('$base')" >"$site/zz_gpu_check_base.pth" || return 1
    "$PY" -m pip --version || { echo "pip does not run in $VENV (from $base)"; return 1; }
    if ls "$DEV"/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --no-deps --no-compile --ignore-installed --disable-pip-version-check \
            "$DEV"/wheels/*.whl || return 1
    fi
}

build_llama() {
    local sdist src arch stamp want_stamp sdist_sha
    sdist=$(ls "$DEV"/sdist/llama_cpp_python-$LLAMA_VERSION*.tar.gz 2>/dev/null | head -n 1 || true)
    [ -n "$sdist" ] || die "no llama-cpp-python $LLAMA_VERSION sdist in .device/sdist: run benchmarks/gpu_prepare.sh where there is network, and carry .device/sdist"
    arch=${GPU_CHECK_CUDA_ARCH:-}
    [ -n "$arch" ] || [ -z "$SMI" ] || arch=$("$SMI" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$arch" ] || arch=90
    # Minimal: this GPU's architecture only, no multimodal library, flash-attention vector kernels for the
    # f16 and q8_0 caches only (the defaults add q4_0 and bf16).
    LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=off -DGGML_CUDA_FA_QUANTS=f16-f16;q8_0-q8_0 -DGGML_NATIVE=${GPU_CHECK_NATIVE:-on} $CUDA_CMAKE_ARGS"
    [ "${GPU_CHECK_FA:-on}" != off ] || LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DGGML_CUDA_FA=OFF"
    sdist_sha=$(sha256sum "$sdist" | cut -c1-16)
    want_stamp="$sdist_sha $LLAMA_CMAKE_ARGS"
    stamp=$WORK/build/llama.stamp
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] && cuda_build_ok; then
        say "llama-cpp-python: the CUDA build in .device/work is kept (sm_$arch${GPU_NAME:+, GPU offload: yes})"
        note "build: llama-cpp-python CUDA build kept from an earlier call"
        return 0
    fi
    [ -x "$PY" ] || step "venv and wheels" 30 make_venv || die "could not make the venv (see $LOG)"
    src=$WORK/src/llama_cpp_python-$LLAMA_VERSION
    if [ ! -f "$WORK/src/.unpacked" ] || [ "$(cat "$WORK/src/.unpacked")" != "$sdist_sha" ]; then
        rm -rf "$WORK/src"
        mkdir -p "$WORK/src"
        tar -xzf "$sdist" -C "$WORK/src"
        echo "$sdist_sha" >"$WORK/src/.unpacked"
    fi
    [ -d "$src" ] || die "the sdist $sdist has no llama_cpp_python-$LLAMA_VERSION folder"
    rm -f "$stamp"
    mkdir -p "$WORK/build"
    # One build folder kept across calls: a build stopped by the time limit goes on where it stopped.
    step "build llama-cpp-python (CUDA sm_$arch, $(nproc) jobs)" 120 \
        env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PY" -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir --force-reinstall \
        --disable-pip-version-check --config-settings=build-dir="$WORK/build/llama" "$src" ||
        die "the llama-cpp-python CUDA build failed (its output is in $LOG)"
    cuda_build_ok || die "llama-cpp-python was built, but it has no CUDA backend or llama.cpp reports no GPU offload (see $LOG)"
    echo "$want_stamp" >"$stamp"
}

build() {
    if [ "$CPU" = 1 ]; then
        "$PY" -c 'import llama_cpp, sda_local' 2>/dev/null ||
            die "--cpu uses the installed sda-local, but $PY cannot import llama_cpp and sda_local (activate the project's venv or set PYTHON)"
        say "CPU mode: $PY, llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)'), sda-local as installed there"
        return 0
    fi
    cuda_env
    build_llama
    # sda-local itself is cheap (libsda): always from this working tree, against the llama.cpp just checked.
    step "install sda-local" 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --force-reinstall --disable-pip-version-check "$ROOT" || die "installing sda-local failed (see $LOG)"
    "$PY" -c 'import sys, llama_cpp; from sda_local.engine import native; sys.exit(0 if native.library() else 1)' >&3 2>&1 ||
        die "sda-local is installed but its libsda does not load (see $LOG)"
    say "build: $("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "GPU offload:", llama_cpp.llama_supports_gpu_offload())' 2>&3)"
}

# ------------------------------------------------------------------------------------------------ models
DONOR=
model_file() {  # model_file SHAPE -> its GGUF path (SHAPE-untied: the tests' model)
    case $1 in
        smollm2-135m*) echo "$WORK/models/$1.Q4_1.gguf" ;;  # the catalogue's SmolLM2 is Q4_1
        *) echo "$WORK/models/$1.Q4_K_M.gguf" ;;
    esac
}
make_model() {
    local shape=${1%-untied} file type tmp need untied=()
    file=$(model_file "$1")
    [ "$shape" = "$1" ] || untied=(--untied)
    [ -s "$file" ] && return 0
    if [ -z "$DONOR" ]; then
        DONOR=$(ls "$DEV"/donor/*.gguf 2>/dev/null | head -n 1 || true)
        [ -n "$DONOR" ] || die "no vocab-only donor in .device/donor: run benchmarks/gpu_prepare.sh where the catalogue model is, and carry .device/donor"
    fi
    case $shape in smollm2-135m) type=q4_1 ;; *) type=q4_k_m ;; esac
    case $shape in llama-8b) need=240 ;; llama-1b*) need=60 ;; *) need=20 ;; esac  # (about, on 16 cores)
    mkdir -p "$WORK/models"
    tmp=${file%.gguf}.partial.gguf
    step "synthesize $1 ($type)" "$need" "$PY" "$ROOT/benchmarks/synth_model.py" "$shape" "$tmp" --type "$type" \
        "${untied[@]}" --donor "$DONOR" --threads "$(nproc)" || return 1
    mv "$tmp" "$file"
}

# ------------------------------------------------------------------------------------------------- tests
run_tests() {
    local model deselect=() t pass
    if [ -f "$RESULTS/tests.txt" ]; then
        say "tests: kept from an earlier call on this machine"
        cat "$RESULTS/tests.txt" >>"$SUMMARY"
        grep -q "^tests: ok" "$RESULTS/tests.txt" || FAILED+=("tests (an earlier call)")
        return 0
    fi
    model=$(model_file smollm2-135m-untied)
    make_model smollm2-135m-untied || return 1
    for t in "${CONTENT_TESTS[@]}"; do deselect+=(--deselect "$t"); done
    # shellcheck disable=SC2086
    if step "tests (${TEST_FILES//tests\//})" 60 env SDA_LOCAL_TEST_MODEL="$model" SDA_LOCAL_TEST_NGL="$NGL" \
        "$PY" -m pytest -q -rfE -p no:cacheprovider $TEST_FILES "${deselect[@]}" ${GPU_CHECK_PYTEST_ARGS:-}; then
        pass=ok
    else
        [ "$SKIPPED" = 0 ] || return 1
        pass=FAILED
    fi
    local counts
    counts=$(output_of "tests (${TEST_FILES//tests\//})" | grep -E '[0-9]+ (passed|failed|errors?|deselected)|no tests ran' | tail -n 1 | tr -d '=' | sed 's/^ *//')
    note "tests: $pass: $counts"
    note "  (deselected, they need the real model's text: ${CONTENT_TESTS[*]##*::})"
    # A finished run (passed or failed) is kept; one stopped by the time limit is not.
    if [ -n "$counts" ]; then
        {
            echo "tests: $pass: $counts"
            output_of "tests (${TEST_FILES//tests\//})" | grep -E '^(FAILED|ERROR) ' | sed 's/^/  /' || true
            echo "  (deselected, they need the real model's text: ${CONTENT_TESTS[*]##*::})"
        } >"$RESULTS/tests.txt"
        output_of "tests (${TEST_FILES//tests\//})" | grep -E '^(FAILED|ERROR) ' | sed 's/^/  /' >>"$SUMMARY" || true
    fi
}

# ------------------------------------------------------------------------------------------------- bench
SDA_BIN() { "$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "sda-local"))'; }
run_bench() {  # run_bench SHAPE
    local shape=$1 model sda gpu=()
    make_model "$shape" || return 1
    model=$(model_file "$shape")
    sda=$(SDA_BIN)
    [ "$NGL" = 0 ] || gpu=(--n-gpu-layers "$NGL")  # (a CPU-mode sda-local may predate the option)
    if [ -s "$RESULTS/bench-$shape.json" ]; then
        say "bench $shape: kept from an earlier call on this machine"
    else
        step "bench $shape" 45 sh -c '"$@" > "$0.partial" && mv "$0.partial" "$0"' "$RESULTS/bench-$shape.json" \
            "$sda" bench -m "$model" "${gpu[@]}" --threads "$THREADS" --tokens "$TOKENS" --runs "$RUNS" --json || true
    fi
    if [ -s "$RESULTS/serve-$shape.json" ]; then
        say "bench --serve $shape: kept from an earlier call on this machine"
    else
        step "bench --serve $shape" 30 sh -c '"$@" > "$0.partial" && mv "$0.partial" "$0"' "$RESULTS/serve-$shape.json" \
            "$sda" bench --serve -m "$model" "${gpu[@]}" --threads "$THREADS" --tokens "$TOKENS" --runs "$RUNS" \
            --json || true
    fi
    report "$shape"
}

report() {  # the key numbers of SHAPE's bench reports, into the summary and the results file
    "$PY" - "$RESULTS" "$1" "$OUT/gpu_check_results.json" >>"$SUMMARY" 2>&3 <<'EOF' || true
import json, os, sys
results, shape, merged = sys.argv[1:4]
def load(name):
    path = os.path.join(results, f"{name}-{shape}.json")
    return json.load(open(path)) if os.path.exists(path) else None
bench, serve = load("bench"), load("serve")
all_results = json.load(open(merged)) if os.path.exists(merged) else {}
all_results[shape] = {"bench": bench, "serve": serve}
json.dump(all_results, open(merged, "w"), indent=1)
target = " (the target shape)" if shape == "llama-1b" else ""
if bench:
    a, s = bench["arms"], bench["summary"]
    b = a["sda-batched"]  # the default SDA mode
    plain, sda = a["llama-cpp-python"]["tokens_per_second"], b["tokens_per_second"]
    print(f"{shape}{target}, {bench.get('n_gpu_layers', 0)} GPU layers, {bench['tokens']} tokens, median of "
          f"{bench['runs']}: plain (llama-cpp-python) {plain:.1f} tok/s, engine plain "
          f"{a['engine-plain']['tokens_per_second']:.1f}, SDA batched {sda:.1f}, SDA contexts "
          f"{a['sda-contexts']['tokens_per_second']:.1f}, SDA batched numpy fusion "
          f"{a['sda-batched-numpy']['tokens_per_second']:.1f}")
    ratio = sda / plain
    print(f"  SDA (batched, the default) / plain: {ratio:.2f} (target >= 0.9: "
          f"{'met' if ratio >= 0.9 else 'MISSED'}); the best SDA mode, {s['best_sda_mode']}: {s['sda_over_plain']:.2f}")
    if "raw_2_rows_over_1" in s:
        print(f"  raw decode 2 rows / 1 row a step: {s['raw_2_rows_over_1']:.2f}; SDA / engine plain "
              f"{s['sda_over_engine_plain']:.2f} = {s['sda_share_of_raw_ratio']:.2f} of it (CPU target >= 0.95)")
    fusion, chain = b["fusion_us_per_token"] or 0.0, b["chain_us_per_token"] or 0.0
    share = (fusion + chain) * sda / 1e6
    print(f"  fusion + sampling share of an SDA step: {100 * share:.1f}% (target <= 5%: "
          f"{'met' if share <= 0.05 else 'MISSED'}): native fusion {fusion:.0f} us/token, the rest of the sampling "
          f"chain {chain:.0f} us/token, a step {1e6 / sda:.0f} us; SDA peak RSS - plain "
          f"{b['peak_rss_mb'] - a['llama-cpp-python']['peak_rss_mb']:+.0f} MB")
else:
    print(f"{shape}: no bench report")
if serve:
    t, sc = serve["tokens_per_second"], serve["scaling"]
    tps = " / ".join(f"{t['scheduler'][n]:.1f}" for n in t["scheduler"])
    raw = " / ".join(f"{t['raw'][n]:.1f}" for n in t["raw"])
    print(f"  serve: 1/2/4 concurrent SDA requests {tps} tok/s (raw decode limit {raw}; 4 vs one "
          f"{sc['4'] if '4' in sc else sc[4]:.2f}x); scheduler work beyond llama_decode "
          f"{100 * serve['step_overhead_share']:.1f}% of it")
else:
    print(f"  serve: no report")
EOF
}

# -------------------------------------------------------------------------------------------------- main
if want build || want models || want test || want bench || want big; then
    build
fi
if want models; then
    for shape in $SHAPES; do make_model "$shape" || true; done
fi
# The first shape's benches (the target shape, llama-1b) before the tests, the rest after: what matters most
# first, should the time run out.
FIRST=${SHAPES%% *}
if want bench; then
    run_bench "$FIRST" || true
fi
if want test; then
    run_tests || true
fi
if want bench; then
    for shape in $SHAPES; do
        [ "$shape" = "$FIRST" ] || run_bench "$shape" || true
    done
fi
if want big; then
    run_bench llama-8b || true
fi

say "----- summary ($((SECONDS - STARTED))s in all; log: $LOG)"
cat "$SUMMARY"
echo "----- summary" >&3
cat "$SUMMARY" >&3
if [ ${#FAILED[@]} -gt 0 ]; then
    die "$(IFS=,; echo "failed: ${FAILED[*]}" | sed 's/,/, /g')"
fi
