"""Steering variants on the IFEval development set, for choosing a default (README, "Steering without echo").

    python benchmarks/steering_dev.py --questions 20:28 --arm prompt --arm paper:0.5 \\
        --arm guarded:0.5:echo_run=2 --out /tmp/sweep.jsonl

An arm is NAME:STRENGTH[:key=value,...]: ``prompt`` (a = 0, fixed T), ``paper`` (the paper's formula) or
``guarded`` (steering.Steering with the given clip / plaus / echo_run / guard / parts=1 / cap=1 / onset=N),
optionally ``t=fixed|paper|reference``. Each (type, question) gets the same seed in every arm. Prints compliance,
echo and degeneration per type and pooled, and pooled the mean fluency (quality.fluency) and the clean compliance
(quality.clean: complied, no echo, no loop, fluency >= quality.CLEAN_FLUENCY). Results are appended to --out and
reused on a rerun (same arm label, type, question).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda_local.evaluation import ifeval, quality  # noqa: E402
from sda_local.engine import SDAEngine  # noqa: E402
from sda_local.engine.steering import Steering  # noqa: E402
from sda_local.seeds import derive_seed  # noqa: E402

DEV = Path(__file__).resolve().parents[1] / "sda_local" / "evaluation" / "data" / "dev_questions.jsonl"


def parse_arm(spec: str):
    name, strength, *rest = spec.split(":")
    options = dict(kv.split("=") for kv in (rest[0].split(",") if rest else []))
    temperature = options.pop("t", "fixed" if name == "prompt" else "paper")
    if name == "prompt":
        return 0.0, temperature, Steering()
    if name == "paper":
        return float(strength), temperature, Steering()
    steering = Steering("guarded", clip=float(options.get("clip", 0)), plausibility=float(options.get("plaus", 0)),
                        echo_run=int(options.get("echo_run", 0)), guard_to=options.get("guard", "without"),
                        parts=options.get("parts", "0") == "1", cap=options.get("cap", "0") == "1",
                        onset=int(options.get("onset", 0)))
    return float(strength), temperature, steering.check()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", default="0:20")
    ap.add_argument("--types", default="all")
    ap.add_argument("--arm", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--numpy", action="store_true", help="the numpy fusion (for prototypes)")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.questions.split(":"))
    questions = [json.loads(line)["query"] for line in DEV.read_text().splitlines()][lo:hi]
    types = ifeval.TYPES if args.types == "all" else tuple(args.types.split(","))
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["type"], r["q"])] = r
    engine = SDAEngine(args.model, parallel=args.parallel, n_ctx=1024,
                       fusion_backend="numpy" if args.numpy else "auto")
    lock = threading.Lock()
    sink = out.open("a")

    base_answers = {}

    def unit(arm, t, qi):
        query = questions[qi - lo]
        if (arm, t, qi) in done:
            rec = done[(arm, t, qi)]
            if "fluency" not in rec and arm != "self-r":  # a record from before fluency was measured
                rec["fluency"] = quality.fluency(engine, query, rec["instruction"], rec["text"])
                with lock:
                    sink.write(json.dumps(rec) + "\n")  # the later line wins on a rerun
                    sink.flush()
            return rec
        seed = derive_seed(0, qi)
        case = ifeval.make_case(t, query, seed)
        if arm == "self-r":  # the self judge's likelihood ratio of the first answer (no instruction)
            from sda_local.judging.selfscore import SelfJudge
            from sda_local.prompts import resolve_alignment

            with lock:
                if qi not in base_answers:
                    base_answers[qi] = engine.generate(query, None, seed=seed, max_tokens=args.tokens).text
            base = base_answers[qi]
            r = SelfJudge(engine).ratio(query, base, resolve_alignment(case.instruction))
            rec = {"arm": arm, "type": t, "q": qi, "text": base, "r": r, "complied": case.check(base),
                   "echo": False, "echo_share": 0.0, "degenerate": False, "instruction": case.instruction}
            with lock:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
            return rec
        strength, temperature, steering = parse_arm(arm)
        r = engine.generate(query, case.instruction, strength=strength, temperature_mode=temperature,
                            steering=steering, seed=seed, max_tokens=args.tokens)
        e = quality.echo(r.text, case.instruction, query, case.required_texts())
        d = quality.degeneration(r.text)
        rec = {"arm": arm, "type": t, "q": qi, "text": r.text, "complied": case.check(r.text), "echo": e.echoed,
               "echo_share": e.share, "degenerate": d.degenerate, "instruction": case.instruction,
               "fluency": quality.fluency(engine, query, case.instruction, r.text)}
        with lock:
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
        return rec

    jobs = [(arm, t, qi) for arm in args.arm for t in types for qi in range(lo, hi)]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: unit(*j), jobs))
    engine.close()
    by = {}
    for r in results:
        by.setdefault((r["arm"], r["type"]), []).append(r)
    print("| type | " + " | ".join(args.arm) + " |")
    for t in types:
        cells = []
        for arm in args.arm:
            rs = by[(arm, t)]
            n = len(rs)
            cells.append(f"{100*sum(r['complied'] for r in rs)/n:.0f}/{100*sum(r['echo'] for r in rs)/n:.0f}/"
                         f"{100*sum(r['degenerate'] for r in rs)/n:.0f}")
        print(f"| {t} | " + " | ".join(cells) + " |")
    cells = []
    for arm in args.arm:
        rs = [r for r in results if r["arm"] == arm]
        n = len(rs)
        fl = [r["fluency"] for r in rs if r.get("fluency") is not None]
        clean = sum(quality.clean(r["complied"], r["echo"], r["degenerate"], r.get("fluency")) for r in rs)
        cells.append(f"**{100*sum(r['complied'] for r in rs)/n:.1f}/{100*sum(r['echo'] for r in rs)/n:.1f}/"
                     f"{100*sum(r['degenerate'] for r in rs)/n:.1f}/{sum(fl)/max(1, len(fl)):.2f}/{100*clean/n:.1f}**")
    print("| pooled (compliance/echo/degenerate %/fluency/clean %) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
