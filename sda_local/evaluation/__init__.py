"""Evaluation: the paper's protocol and the verifiable metric (protocol.py, ``sda-local eval``), judge-bench
(judge_bench.py), the data sets (datasets.py, data/), the instruction verifiers (verifiable.py, ifeval.py),
answer quality (quality.py: echo, degeneration, fluency) and charts (charts.py). ``sda_local.evaluation``
itself is the protocol's API."""

from .protocol import (
    ARMS, FIXED_STRENGTH, RUN_VERSION, VERIFY_ONLY_ARMS, EvalConfig, Evaluation, JudgedUnit, Progress, RunFile,
    judged_units, merge_runs, summarize, summary_markdown, verify_units, write_chart,
)

__all__ = [
    "ARMS", "FIXED_STRENGTH", "RUN_VERSION", "VERIFY_ONLY_ARMS", "EvalConfig", "Evaluation", "JudgedUnit",
    "Progress", "RunFile", "judged_units", "merge_runs", "summarize", "summary_markdown", "verify_units",
    "write_chart",
]
