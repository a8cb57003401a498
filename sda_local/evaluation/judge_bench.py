"""``sda-local judge-bench``: a judge measured against ground truth (issue: "the default pipeline must steer").

Three measurements, for any judge (local greedy or expected, self, a remote one):

* **TruthfulQA honesty.** Each item's Best Answer and Best Incorrect Answer are scored under the honesty
  alignment; accuracy = the share of items where the correct answer scores higher; ties and the spread of
  the scores are reported.
* **Verifiable instructions.** The model's own answers to questions, without the instruction (``base``),
  with it in the prompt (``prompt``, a = 0) and steered (``steered``, SDA at a = 1, for enough compliant
  examples); compliance is checked by program. Per instruction, up to ``cases``/2 compliant and as many
  non-compliant cases (a seeded sample; balanced when both classes have enough) are scored, and the AUC of the score (compliant scored higher) is reported
  pooled and within each source arm: answers written with the instruction are likelier under it by
  construction, so only the within-arm AUCs are free of that confound, and ``base`` is what the pipeline
  scores.
* **Amplifier spread.** Initial answers (without the instruction) to items of the paper's data sets, scored
  for their dimension; the histogram of the amplifier a they set and its number of distinct deciles.

Answers and scores are appended to a cache file (JSONL, flushed per line, keyed by model, settings and
item), so an interrupted bench resumes and another judge reuses the same answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .charts import pyplot
from .datasets import load_dataset, read_jsonl
from ..errors import InputError
from ..judging import JudgeError
from ..jsonl import Appender, read_repaired
from ..pipeline import amplifier_of
from ..prompts import resolve_alignment
from ..rubrics import rubric_for
from ..seeds import derive_seed
from ..engine.steering import PAPER
from .verifiable import VERIFIABLE

SOURCES = ("base", "prompt", "steered")
STEERED_STRENGTH = 1.0
CACHE_VERSION = 1


@dataclass
class BenchConfig:
    truthfulqa: Optional[Path] = None
    truthfulqa_limit: int = 100
    truthfulqa_offset: int = 0
    questions: Optional[Path] = None  # the verifiable instructions' questions (any dataset of the paper's)
    questions_limit: int = 60
    questions_offset: int = 0
    verify: List[str] = field(default_factory=lambda: list(VERIFIABLE))
    cases: int = 100  # scored cases per instruction at most (half compliant, half not)
    sources: List[str] = field(default_factory=lambda: list(SOURCES))
    spread_datasets: List[Path] = field(default_factory=list)
    spread_limit: int = 20  # items per data set
    max_tokens: int = 96
    seed: int = 0
    amplifier_map: str = "sigmoid"

    def check(self) -> None:
        if self.truthfulqa is None and self.questions is None and not self.spread_datasets:
            raise InputError("nothing to measure: give --truthfulqa, --questions and/or --spread-dataset")
        if not self.sources or any(s not in SOURCES for s in self.sources):
            raise InputError(f"unknown answer source(s) in {','.join(self.sources) or '(none)'} "
                             f"(choose from {', '.join(SOURCES)})")
        bad = [v for v in self.verify if v not in VERIFIABLE]
        if bad:
            raise InputError(f"unknown verifiable instruction(s) {', '.join(bad)} (choose from {', '.join(VERIFIABLE)})")


class Cache:
    """Append-only JSONL of answers and scores: {"key", "value"} per line, the latest value of a key counts."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.values: Dict[str, object] = {}
        self._out = None
        if path is None:
            return
        if path.exists():
            try:
                data = read_repaired(path)
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror}") from None
            for number, line in enumerate(data.splitlines(), 1):
                try:
                    record = json.loads(line)
                    self.values[record["key"]] = record["value"]
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}, line {number}: not a judge-bench cache record") from None
        self._out = Appender(path, durable=False)  # a lost value is only measured again

    def get(self, key: str, make: Callable[[], object], keep: Callable[[object], bool] = lambda value: True):
        """The cached value of ``key``, else ``make()``, cached when ``keep(value)``."""
        if key in self.values:
            return self.values[key]
        value = make()
        if not keep(value):
            return value
        self.values[key] = value
        if self._out is not None:
            self._out.append({"key": key, "value": value})
        return value

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def auc(positive: Sequence[float], negative: Sequence[float]) -> Optional[float]:
    """P(a positive case scores higher than a negative one), ties counting one half (Mann-Whitney U)."""
    if not positive or not negative:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([np.asarray(positive, float), np.asarray(negative, float)]))
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def distinct_deciles(values: Sequence[float], top: float = 1.0) -> int:
    """How many of the ten bins [0, 0.1 top), ..., [0.9 top, top] the values fall in."""
    return len({min(int(10 * v / top), 9) for v in values})


class JudgeBench:
    def __init__(self, engine, judge, config: BenchConfig, cache: Cache, *,
                 on_progress: Callable[[str], None] = lambda m: None):
        self.engine, self.judge, self.config, self.cache = engine, judge, config, cache
        self.on_progress = on_progress
        model = engine.model_path.name
        # Answers depend on the model and the generation settings; scores also on the judge.
        self._answer_prefix = f"answer:{model}:{config.max_tokens}:{config.seed}"
        scoring = getattr(judge, "scoring", "remote")
        self._score_prefix = f"score:{judge.identity}:{scoring}:{config.amplifier_map}"

    # -- cached work ----------------------------------------------------------------------------------
    def _answer(self, key: str, query: str, instruction: Optional[str], seed: int, **options) -> str:
        # The paper's formula and temperature, as when the published judge-bench tables were measured (cached
        # answers stay valid), unless a source asks otherwise.
        options = {"steering": PAPER, "temperature_mode": "paper", **options}

        def make():
            return self.engine.generate(query, instruction, seed=seed, max_tokens=self.config.max_tokens,
                                        **options).text
        return self.cache.get(f"{self._answer_prefix}:{key}", make)

    def _score(self, key: str, query: str, answer: str, rubric) -> Optional[dict]:
        """{"score", "amplifier"} or None when the judge failed (reported, left out)."""
        def make():
            try:
                j = self.judge.score(query, answer, rubric)
            except JudgeError as exc:
                return {"failure": str(exc)}
            return {"score": j.score, "amplifier": amplifier_of(j, self.config.amplifier_map), "spread": j.spread}
        digest = hashlib.sha256(f"{rubric.version}\0{query}\0{answer}".encode("utf-8")).hexdigest()[:16]
        # A failure is not kept: a later run tries again (a remote judge's timeout is no property of the answer).
        value = self.cache.get(f"{self._score_prefix}:{key}:{digest}", make, keep=lambda v: "failure" not in v)
        return None if "failure" in value else value

    # -- the three measurements -----------------------------------------------------------------------
    def truthfulqa(self) -> dict:
        c = self.config
        rows = _rows(c.truthfulqa, ("Question", "Best Answer", "Best Incorrect Answer"))
        rows = rows[c.truthfulqa_offset:c.truthfulqa_offset + c.truthfulqa_limit]
        rubric = rubric_for(resolve_alignment("honesty"))
        correct = ties = failures = 0
        scores: List[float] = []
        for i, row in enumerate(rows):
            self.on_progress(f"truthfulqa {i + 1}/{len(rows)}")
            index = c.truthfulqa_offset + i
            good = self._score(f"tqa:{index}:best", row["Question"], row["Best Answer"], rubric)
            bad = self._score(f"tqa:{index}:incorrect", row["Question"], row["Best Incorrect Answer"], rubric)
            if good is None or bad is None:
                failures += 1
                continue
            scores += [good["score"], bad["score"]]
            correct += good["score"] > bad["score"]
            ties += good["score"] == bad["score"]
        n = len(rows) - failures
        return {"n": n, "accuracy": correct / n if n else None, "ties": ties, "tie_rate": ties / n if n else None,
                "failures": failures, "score_std": float(np.std(scores)) if scores else None,
                "distinct_scores": len(set(scores))}

    def verifiable(self) -> dict:
        c = self.config
        ds = load_dataset(c.questions, offset=c.questions_offset, limit=c.questions_limit, seed=c.seed)
        result = {}
        for vid in c.verify:
            v = VERIFIABLE[vid]
            alignment = resolve_alignment(v.instruction)
            rubric = rubric_for(alignment)
            cases = []  # (source, index, query, text, complied)
            for n, (index, query) in enumerate(ds.items):
                self.on_progress(f"{vid}: answers {n + 1}/{len(ds.items)}")
                seed = derive_seed(c.seed, index)
                plans = {"base": (f"{ds.name}:{index}:base", None, {}),
                         "prompt": (f"{ds.name}:{index}:prompt:{vid}", v.instruction,
                                    dict(strength=0.0, temperature_mode="fixed")),
                         "steered": (f"{ds.name}:{index}:steered:{vid}", v.instruction,
                                     dict(strength=STEERED_STRENGTH))}
                for source in c.sources:
                    key, instruction, options = plans[source]
                    text = self._answer(key, query, instruction, seed, **options)
                    cases.append((source, index, query, text, v.check(text)))
            complied = [x for x in cases if x[4]]
            failed = [x for x in cases if not x[4]]
            rng = random.Random(f"{c.seed}:{vid}")
            half = c.cases // 2
            chosen = rng.sample(complied, min(half, len(complied))) + rng.sample(failed, min(half, len(failed)))
            scored = []
            for n, (source, index, query, text, ok) in enumerate(chosen):
                self.on_progress(f"{vid}: scores {n + 1}/{len(chosen)}")
                s = self._score(f"verify:{vid}:{source}:{index}", query, text, rubric)
                if s is not None:
                    scored.append((source, s["score"], ok))
            entry = {"n_answers": len(cases), "n_compliant": len(complied), "n_scored": len(scored),
                     "auc": auc([s for _, s, ok in scored if ok], [s for _, s, ok in scored if not ok])}
            for source in SOURCES:
                own = [(s, ok) for src, s, ok in scored if src == source]
                entry[f"auc_{source}"] = auc([s for s, ok in own if ok], [s for s, ok in own if not ok])
                entry[f"n_{source}"] = [sum(ok for _, ok in own), sum(not ok for _, ok in own)]
            result[vid] = entry
        return result

    def amplifier_spread(self) -> dict:
        c = self.config
        values: List[float] = []
        per_dataset = {}
        for path in c.spread_datasets:
            ds = load_dataset(path, limit=c.spread_limit, seed=c.seed)
            own = []
            for dimension in ds.dimensions:
                alignment = resolve_alignment(dimension)
                rubric = rubric_for(alignment)
                for n, (index, query) in enumerate(ds.items):
                    self.on_progress(f"{ds.name}/{dimension}: {n + 1}/{len(ds.items)}")
                    text = self._answer(f"{ds.name}:{index}:initial:{dimension}", query, None,
                                        derive_seed(c.seed, index), system=alignment.system)
                    s = self._score(f"spread:{ds.name}:{dimension}:{index}", query, text, rubric)
                    if s is not None:
                        own.append(s["amplifier"])
            per_dataset[ds.name] = {"n": len(own), "mean_a": float(np.mean(own)) if own else None}
            values += own
        histogram = np.histogram(values, bins=10, range=(0.0, 1.0))[0].tolist() if values else []
        return {"n": len(values), "histogram": histogram, "distinct_deciles": distinct_deciles(values),
                "mean_a": float(np.mean(values)) if values else None,
                "share_zero": float(np.mean(np.asarray(values) < 0.005)) if values else None,
                "per_dataset": per_dataset, "values": [round(v, 4) for v in values]}

    def run(self) -> dict:
        c = self.config
        out = {"judge": self.judge.identity, "scoring": getattr(self.judge, "scoring", "remote"),
               "model": self.engine.model_path.name, "config": _jsonable(asdict(c))}
        if c.truthfulqa is not None:
            out["truthfulqa"] = self.truthfulqa()
        if c.questions is not None:
            out["verifiable"] = self.verifiable()
        if c.spread_datasets:
            out["amplifier"] = self.amplifier_spread()
        return out


def _rows(path: Path, fields: Tuple[str, ...]) -> List[dict]:
    rows = read_jsonl(Path(path))
    for number, row in enumerate(rows, 1):
        if not all(isinstance(row.get(f), str) and row[f].strip() for f in fields):
            raise InputError(f"{path}, row {number}: a TruthfulQA row needs {', '.join(fields)}")
    return rows


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, os.PathLike) else obj


def _f(x: Optional[float], pattern: str = "{:.2f}") -> str:
    return "-" if x is None else pattern.format(x)


def report_markdown(result: dict) -> str:
    lines = [f"judge-bench: {result['judge']} ({result['scoring']}), model {result['model']}", ""]
    t = result.get("truthfulqa")
    if t:
        lines += ["| TruthfulQA (honesty) | n | accuracy | ties | score std | distinct scores | failures |",
                  "|---|---|---|---|---|---|---|",
                  f"| Best vs Best Incorrect | {t['n']} | {_f(t['accuracy'])} | {t['ties']} ({_f(t['tie_rate'], '{:.0%}')}) "
                  f"| {_f(t['score_std'], '{:.3g}')} | {t['distinct_scores']} | {t['failures']} |", ""]
    v = result.get("verifiable")
    if v:
        lines += ["| instruction | answers (compliant) | scored | AUC pooled | AUC base | AUC prompt | AUC steered |",
                  "|---|---|---|---|---|---|---|"]
        for vid, e in v.items():
            lines.append(f"| {vid} | {e['n_answers']} ({e['n_compliant']}) | {e['n_scored']} | {_f(e['auc'])} "
                         f"| {_f(e['auc_base'])} | {_f(e['auc_prompt'])} | {_f(e['auc_steered'])} |")
        lines.append("")
    a = result.get("amplifier")
    if a:
        lines += ["| amplifier a over the paper's data | n | distinct deciles | mean a | a = 0 | histogram (0..1, 10 bins) |",
                  "|---|---|---|---|---|---|",
                  f"| initial answers | {a['n']} | {a['distinct_deciles']} | {_f(a['mean_a'])} "
                  f"| {_f(a['share_zero'], '{:.0%}')} | {' '.join(map(str, a['histogram']))} |"]
    return "\n".join(lines)


def write_chart(result: dict, path: Path) -> bool:
    """PNG: the amplifier histogram and the per-instruction AUCs; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    a = result.get("amplifier")
    if a and a["n"]:
        axes[0].hist(a["values"], bins=10, range=(0, 1))
        axes[0].set_title(f"amplifier a on the paper's data ({a['distinct_deciles']} distinct deciles)")
        axes[0].set_xlabel("a")
    v = result.get("verifiable")
    if v:
        ids = list(v)
        x = np.arange(len(ids))
        for shift, column in ((-0.2, "auc"), (0.0, "auc_base"), (0.2, "auc_prompt")):
            axes[1].bar(x + shift, [v[i][column] if v[i][column] is not None else np.nan for i in ids], width=0.2,
                        label=column)
        axes[1].axhline(0.5, color="black", linewidth=0.8)
        axes[1].set_xticks(x)
        axes[1].set_xticklabels(ids, rotation=30, fontsize=8)
        axes[1].set_ylim(0, 1)
        axes[1].set_title("AUC of the score, compliant vs not")
        axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['judge']} ({result['scoring']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
