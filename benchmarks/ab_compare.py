"""Side-by-side speed of this checkout against an earlier commit: the same `sda-local bench` arm, run in
alternation (A, B, A, B, ...) in one run, so that machine noise hits both alike.

    python benchmarks/ab_compare.py --ref 6e729dc [--model gemma-3-270m-base] [--arm sda-batched]
                                    [--runs 5] [--tokens 96]

The earlier commit is checked out into a temporary git worktree and its libsda is built there with cmake
against the installed llama-cpp-python (it must be the version that commit pins). Each run is one
`python -m sda_local.bench ARM ...` process in the tree being measured. Prints a JSON report: per tree,
the runs and the medians of decode speed, native fusion time per token and (where the tree measures it)
the rest of the sampling chain per token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def build_tree(ref: str, root: Path) -> Path:
    tree = root / "tree"
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    shutil.copy(next(build.glob("native/libsda.*")), tree / "sda_local")
    shutil.copy(tree / "models" / "catalogue.json", tree / "sda_local" / "catalogue.json")
    return tree


def package_root() -> Path:
    """Where the installed sda_local lives (its libsda and catalogue are beside it)."""
    import sda_local

    return Path(sda_local.__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit (A); B is the installed package")
    parser.add_argument("--model", default=None, help="catalogue name or GGUF path (default: the default model)")
    parser.add_argument("--arm", default="sda-batched")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from sda_local import models

    model = str(models.resolve(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="sda-ab-") as tmp:
        trees = {f"A {args.ref}": build_tree(args.ref, Path(tmp)), "B this checkout": package_root()}
        samples = {name: [] for name in trees}
        try:
            for r in range(args.runs):
                for name, tree in trees.items():
                    print(f"run {r + 1}/{args.runs}: {name}", file=sys.stderr)
                    proc = subprocess.run([sys.executable, "-m", "sda_local.bench", args.arm, model,
                                           str(args.threads), str(args.tokens), "2048"],
                                          capture_output=True, text=True, cwd=tree)
                    if proc.returncode != 0:
                        print(f"error: {name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}",
                              file=sys.stderr)
                        return 1
                    samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(trees[f"A {args.ref}"])],
                           capture_output=True)

    def medians(runs):
        out = {}
        for key in ("tokens_per_second", "fusion_us_per_token", "chain_us_per_token"):
            values = [s[key] for s in runs if s.get(key) is not None]
            out[key] = {"median": statistics.median(values), "runs": [round(v, 1) for v in values]} if values else None
        return out

    report = {"model": model, "arm": args.arm, "tokens": args.tokens, "runs": args.runs,
              "trees": {name: medians(runs) for name, runs in samples.items()}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
