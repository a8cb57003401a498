"""Evaluation data: the SDA paper's five sets (formats detected from their fields) and any JSONL of queries.

The project ships no copies: point ``--dataset`` at the files (the paper's sets are public; several are
licensed for non-commercial use only, see README).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    query_field: str
    dimensions: Tuple[str, ...]
    signature: Tuple[str, ...]  # fields whose presence identifies the format


# Most specific signatures first (empathetic and beavertails both have "prompt" and "category").
FORMATS: Tuple[DatasetFormat, ...] = (
    DatasetFormat("dialogsum", "dialogue", ("summarization",), ("dialogue", "summary1")),
    DatasetFormat("truthfulqa", "Question", ("honesty",), ("Question", "Best Answer")),
    DatasetFormat("harmfulqa", "question", ("helpfulness", "harmlessness"), ("question", "topic", "subtopic")),
    DatasetFormat("beavertails", "prompt", ("helpfulness", "harmlessness"), ("prompt", "category_id")),
    DatasetFormat("empathetic_dialogues", "prompt", ("empathy",), ("prompt", "category")),
    DatasetFormat("sda-dev", "query", ("helpfulness",), ("query", "dev_set")),
)

# This project's development questions (written for it, not from any benchmark): the verifiable metric's queries
# (``eval --dataset dev --verify ifeval``). 0-19 are the reported half; 20-39 were used to choose the defaults.
DEV_SET_NAME = "dev"
DEV_SET = Path(__file__).resolve().parent / "data" / "dev_questions.jsonl"


@dataclass
class Dataset:
    name: str
    path: Path
    format: Optional[str]  # None for a user file
    dimensions: Tuple[str, ...]
    items: List[Tuple[int, str]]  # (index in the file, query)


def read_jsonl(path: Path) -> List[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); one-line InputErrors for anything else."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read dataset {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InputError(f"{path}, line {number}: not a JSON object in UTF-8") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {number}: not a JSON object")
        rows.append(row)
    if not rows:
        raise InputError(f"dataset {path} is empty")
    return rows


def detect_format(row: dict) -> Optional[DatasetFormat]:
    for fmt in FORMATS:
        if all(field in row for field in fmt.signature):
            return fmt
    return None


def load_dataset(path, *, query_field: Optional[str] = None, dimensions: Sequence[str] = (),
                 offset: int = 0, limit: Optional[int] = None, sample: Optional[int] = None,
                 seed: int = 0) -> Dataset:
    """Load a dataset; ``query_field`` and ``dimensions`` are required for a file of unknown format.

    Items are taken from ``offset``; ``sample`` draws that many at random (seeded) from what remains,
    ``limit`` then keeps the first ``limit``.
    """
    path = Path(path)
    rows = read_jsonl(path)
    fmt = detect_format(rows[0]) if query_field is None else None
    if fmt is None and query_field is None:
        known = ", ".join(f.name for f in FORMATS)
        raise InputError(f"{path}: unknown dataset format (known: {known}); give --query-field and --dimension")
    field = query_field or fmt.query_field
    dims = tuple(dimensions) or (fmt.dimensions if fmt else ())
    if not dims:
        raise InputError(f"{path}: say which alignment dimension(s) to evaluate (--dimension)")
    items = []
    for index, row in enumerate(rows):
        query = row.get(field)
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"{path}, line {index + 1}: missing or empty field {field!r}")
        items.append((index, query))
    items = items[offset:]
    if sample is not None:
        items = sorted(random.Random(seed).sample(items, min(sample, len(items))))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise InputError(f"{path}: no items left after --offset/--limit/--sample")
    return Dataset(fmt.name if fmt else path.stem, path, fmt.name if fmt else None, dims, items)


# The paper's Table 1 averages of SDA vs base (full set), in %, keyed by (dataset format, dimension).
PAPER_OMEGA: Dict[Tuple[str, str], float] = {
    ("empathetic_dialogues", "empathy"): 81.7,
    ("dialogsum", "summarization"): 40.7,
    ("beavertails", "helpfulness"): 37.7,
    ("beavertails", "harmlessness"): 13.1,
    ("harmfulqa", "helpfulness"): 46.8,
    ("harmfulqa", "harmlessness"): 9.8,
    ("truthfulqa", "honesty"): 28.4,
}
