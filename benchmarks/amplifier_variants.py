"""What the steered answer does after a prompted first answer that missed its instruction: the variants measured
to choose the verify judge's a (README, "Steering without echo").

    sda-local eval -d dev --verify ifeval --verify-only --arms prompt-only --verify-strength judge \\
        --verify-limit 20 --offset 20 -n 96 --parallel 8 --n-ctx 1024 --run tune.jsonl
    python benchmarks/amplifier_variants.py tune.jsonl --a 1 --onset 0 [--t0 0.6] [--seed-shift 0] [--set JSON]

Takes a run of the verify (or auto) judge on the tuning questions, keeps every unit whose prompted first answer
complied (its answer stands, as in the pipeline), and answers the others again with the variant: a, the onset,
T0, a seed shifted from the unit's, other fields of the default Steering (``--set '{"cap": false}'``). The
same seed per unit as the run's. Prints pooled compliance (IFEval's strict check), echo and degeneration
beside prompting alone's, and writes each steered answer to ``--out`` (JSON). Never beside the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda_local import SDAEngine  # noqa: E402
from sda_local.engine.steering import DEFAULT_STEERING  # noqa: E402
from sda_local.evaluation import ifeval, quality  # noqa: E402
from sda_local.evaluation.datasets import DEV_SET, load_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--a", type=float, default=1.0)
    ap.add_argument("--onset", type=int, default=None, help="default: the default steering's")
    ap.add_argument("--t0", type=float, default=0.6)
    ap.add_argument("--seed-shift", type=int, default=0)
    ap.add_argument("--set", default="{}", help="other Steering fields, as JSON")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    steering = DEFAULT_STEERING if args.onset is None else dataclasses.replace(DEFAULT_STEERING, onset=args.onset)
    steering = dataclasses.replace(steering, **json.loads(args.set)).check()
    records = [json.loads(line) for line in args.run.read_text().splitlines()[1:]]
    scores = {r["key"]: r for r in records if r["type"] == "score"}
    checks = {(r["key"], r["arm"]): r for r in records if r["type"] == "check"}
    answers = {(r["key"], r["arm"]): r for r in records if r["type"] == "answer"}
    queries = dict(load_dataset(DEV_SET).items)
    engine = SDAEngine(None, n_ctx=1024, parallel=args.parallel)

    def steer(key: str):
        c = checks[(key, "prompt-only")]
        case = ifeval.case_from_record(c["instruction"], c["instruction_text"], c["kwargs"])
        query = queries[int(key.rsplit(":", 1)[1])]
        seed = answers[(key, "prompt-only")]["stats"]["seed"] + args.seed_shift
        r = engine.generate(query, case.instruction, strength=args.a, temperature_mode="fixed", steering=steering,
                            seed=seed, max_tokens=args.tokens, t0=args.t0)
        echo = quality.echo(r.text, case.instruction, query, case.required_texts())
        return key, dict(text=r.text, complied=case.check(r.text), echo=echo.echoed,
                         degenerate=quality.degeneration(r.text).degenerate)

    missed = [k for k, s in scores.items() if s["amplifier"] > 0]
    with ThreadPoolExecutor(args.parallel) as pool:
        steered = dict(pool.map(steer, missed))
    engine.close()
    if args.out is not None:
        args.out.write_text(json.dumps(steered))
    n = len(scores)
    prompted = [checks[(k, "prompt-only")] for k in scores]
    final = [steered.get(k, checks[(k, "prompt-only")]) for k in scores]

    def pct(rows, field):
        return 100.0 * sum(bool(r[field]) for r in rows) / n

    print(f"a={args.a:g} onset={steering.onset} t0={args.t0:g} seed+{args.seed_shift} {args.set}: {n} units, "
          f"{len(missed)} steered; compliance / echo / degenerate: "
          f"{pct(final, 'complied'):.1f} / {pct(final, 'echo'):.1f} / {pct(final, 'degenerate'):.1f} "
          f"(prompting alone {pct(prompted, 'complied'):.1f} / {pct(prompted, 'echo'):.1f} / "
          f"{pct(prompted, 'degenerate'):.1f})")


if __name__ == "__main__":
    main()
