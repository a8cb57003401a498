"""Per-stage times of the default pipeline (first answer, judging, SDA answer), with the self judge reading r off
an observed first answer (the default) and teacher-forcing the answer afterwards (as before), side by side.

    python benchmarks/pipeline_stages.py [--questions 5] [--tokens 96] [--runs 3]

Never beside the tests (two llama.cpp thread pools on 2 cores slow each other). Both arms answer the same
questions with the same seeds, interleaved; a fresh engine per arm and run, so no cache is shared between them.
Prints each stage's median over questions and runs, and the judging's share of the first answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda_local import SDAEngine, align  # noqa: E402
from sda_local.judging.selfscore import SelfJudge  # noqa: E402

DEV = Path(__file__).resolve().parents[1] / "sda_local" / "evaluation" / "data" / "dev_questions.jsonl"
INSTRUCTION = "Do not use any commas in your answer."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    questions = [json.loads(line)["query"] for line in DEV.read_text().splitlines()][:args.questions]
    stages = {arm: {"initial": [], "judge": [], "sda": []} for arm in ("forced", "observed")}
    for run in range(args.runs):
        for arm in ("forced", "observed"):
            SelfJudge.observes = arm == "observed"  # the switch the pipeline reads (pipeline.observes)
            with SDAEngine(args.model, n_ctx=1024) as engine:
                engine.generate("Warm up.", None, max_tokens=4, seed=0)
                for i, query in enumerate(questions):
                    result = align(engine, query, INSTRUCTION, max_tokens=args.tokens, seed=i)
                    for stage, seconds in result.stage_seconds.items():
                        stages[arm][stage].append(seconds)
            print(f"run {run + 1}/{args.runs}, {arm}: done", file=sys.stderr)
    SelfJudge.observes = True
    report = {arm: {stage: statistics.median(v) for stage, v in s.items()} for arm, s in stages.items()}
    for arm, s in report.items():
        print(f"{arm:9s} first answer {s['initial']:.3f} s, judging {s['judge']:.3f} s "
              f"({100 * s['judge'] / s['initial']:.0f} % of the first answer), SDA answer {s['sda']:.3f} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
