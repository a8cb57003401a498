"""Batch generation over JSONL: one result line per input line, appended and flushed as soon as it exists.

Input lines are JSON objects with ``query`` and optional ``id``, ``instruction`` (preset or text; absent or
null = plain generation), ``strength``, ``seed``, ``max_tokens``, ``temperature_mode``. A line without ``id``
is identified by its line number. An explicit ``"id": null`` fails its line, and a line whose id an earlier
line already has fails with "duplicate id X (also on line N)": results are matched to inputs by id, so a
repeated id would otherwise be taken as already done. ``resume`` skips ids already in the output, after
cutting off a partial last line left by a crash mid-write.
"""

from __future__ import annotations

import collections
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Iterator, Optional, Set, Tuple

from .errors import InputError, SDAError
from .jsonl import Appender, read_complete, read_repaired

LINE_OPTIONS = ("instruction", "strength", "seed", "max_tokens", "temperature_mode")


@dataclass
class BatchReport:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    other_shards: int = 0  # lines left to the other shards (--shard)


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
            if "id" in job and job["id"] is None:
                yield number, None, '"id" is null (give a value, or leave "id" out to use the line number)'
                continue
            job.setdefault("id", number)
            yield number, job, None


def completed_ids(path: Path) -> Set[str]:
    """Ids already in an output file; a partial last line (crash mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = read_repaired(path)
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
    parallel: int = 1,
    on_interrupt: Callable[[], None] = lambda: None,
    shard=None,
) -> BatchReport:
    """Run ``generate(job) -> result fields`` for each job; write ``{"id", **fields}`` lines to the output.

    ``parallel`` > 1 runs that many lines at once in threads (their generations share the engine's batched
    decode); results are still written in input order, each as soon as it and the lines before it are done.
    On an interrupt, ``on_interrupt()`` stops the running generations (the lines written so far stay).
    ``shard`` (shards.Shard): only the lines whose id it holds; the others count as ``other_shards``."""
    if output_path.exists() and output_path.stat().st_size > 0 and not resume:
        raise InputError(f"{output_path} already has results: pass --resume to continue it, or choose another file")
    done = completed_ids(output_path) if resume else set()
    report = BatchReport()
    out = Appender(output_path)
    first_line = {}  # id key -> the line that has it first
    in_flight: Deque[tuple] = collections.deque()  # (number, job, key, future), in input order

    def write_head() -> None:
        number, job, key, future = in_flight.popleft()
        try:
            fields = future.result()
        except SDAError as exc:
            report.failed += 1
            on_event(f"line {number} (id {job['id']}): {exc}")
            return
        out.append({"id": job["id"], **fields})
        done.add(key)
        report.done += 1
        on_event(f"line {number} (id {job['id']}): done")

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sda-batch") if parallel > 1 else None
    try:
        with out:
            for number, job, error in read_jobs(input_path):
                report.total += 1
                if error is not None:
                    report.failed += 1
                    on_event(f"line {number}: {error}")
                    continue
                key = _id_key(job["id"])
                if shard is not None and not shard.holds(key):
                    report.total -= 1
                    report.other_shards += 1
                    continue
                if key in first_line:
                    report.failed += 1
                    on_event(f"line {number}: duplicate id {job['id']} (also on line {first_line[key]})")
                    continue
                first_line[key] = number
                if key in done:
                    report.skipped += 1
                    continue
                if pool is None:
                    in_flight.append((number, job, key, _Ran(generate, job)))
                else:
                    in_flight.append((number, job, key, pool.submit(generate, job)))
                while in_flight and (len(in_flight) > parallel or in_flight[0][3].done()):
                    write_head()
            while in_flight:
                write_head()
    except BaseException:
        on_interrupt()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return report


class _Ran:
    """A call made now, with a future's interface (the one-line-at-a-time path runs in this thread)."""

    def __init__(self, fn, *args):
        self._error = None
        try:
            self._value = fn(*args)
        except SDAError as exc:
            self._error = exc

    def done(self) -> bool:
        return True

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


def merge_outputs(paths, out: Path, input_path: Optional[Path] = None) -> Tuple[int, Set[str]]:
    """One output from the outputs of ``--shard`` batch runs: every result line once (an id in two files is
    an error), in the input's order when ``input_path`` is given (else file by file). Returns (lines
    written, ids of the input that no output has)."""
    if out.exists() and out.stat().st_size > 0:
        raise InputError(f"{out} already has results: choose another file")
    results, origin = {}, {}
    for path in paths:
        try:
            data = read_complete(path)  # the shard's file is left as it is
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        for number, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                key = _id_key(record["id"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}, line {number}: not a batch result line") from None
            if key in results:
                raise InputError(f"id {record['id']} is in both {origin[key]} and {path}")
            results[key], origin[key] = record, path
    order = list(results)
    missing: Set[str] = set()
    if input_path is not None:
        wanted = list(dict.fromkeys(_id_key(job["id"]) for _, job, _ in read_jobs(input_path) if job is not None))
        wanted_set = set(wanted)
        missing = {k for k in wanted if k not in results}
        order = [k for k in wanted if k in results] + [k for k in order if k not in wanted_set]
    with Appender(out) as sink:
        for key in order:
            sink.append(results[key])
    return len(order), missing
