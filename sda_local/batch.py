"""Batch generation over JSONL: one result line per input line, appended and flushed as soon as it exists.

Input lines are JSON objects with ``query`` and optional ``id``, ``instruction`` (preset or text; absent or
null = plain generation), ``strength``, ``seed``, ``max_tokens``, ``temperature_mode``. A line without ``id``
is identified by its line number. ``resume`` skips ids already in the output, after cutting off a partial
last line left by a crash mid-write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Set, Tuple

from .errors import InputError, SDAError

LINE_OPTIONS = ("instruction", "strength", "seed", "max_tokens", "temperature_mode")


@dataclass
class BatchReport:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0


def read_jobs(path: Path) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """(line number, job or None, error or None) for every non-blank line of ``path``."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, "not valid UTF-8"
                continue
            try:
                job = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, None, f"malformed JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(job, dict):
                yield number, None, "not a JSON object"
                continue
            query = job.get("query")
            if not isinstance(query, str) or not query.strip():
                yield number, None, 'missing or empty "query"'
                continue
            job.setdefault("id", number)
            yield number, job, None


def completed_ids(path: Path) -> Set[str]:
    """Ids already in an output file; a partial last line (crash mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for raw in data.splitlines():
        try:
            done.add(_id_key(json.loads(raw)["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _id_key(value) -> str:
    return json.dumps(value, sort_keys=True)


def run_batch(
    input_path: Path,
    output_path: Path,
    generate: Callable[[dict], dict],
    *,
    resume: bool,
    on_event: Callable[[str], None],
) -> BatchReport:
    """Run ``generate(job) -> result fields`` for each job; write ``{"id", **fields}`` lines to the output."""
    if output_path.exists() and output_path.stat().st_size > 0 and not resume:
        raise InputError(f"{output_path} already has results: pass --resume to continue it, or choose another file")
    done = completed_ids(output_path) if resume else set()
    report = BatchReport()
    try:
        out = open(output_path, "a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {output_path}: {exc.strerror}") from None
    with out:
        for number, job, error in read_jobs(input_path):
            report.total += 1
            if error is not None:
                report.failed += 1
                on_event(f"line {number}: {error}")
                continue
            if _id_key(job["id"]) in done:
                report.skipped += 1
                continue
            try:
                fields = generate(job)
            except SDAError as exc:
                report.failed += 1
                on_event(f"line {number} (id {job['id']}): {exc}")
                continue
            out.write(json.dumps({"id": job["id"], **fields}, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            done.add(_id_key(job["id"]))
            report.done += 1
            on_event(f"line {number} (id {job['id']}): done")
    return report
