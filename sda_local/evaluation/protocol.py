"""``sda-local eval``: the SDA paper's evaluation protocol (SPEC.md section 7) and a judge-free metric.

Per item and alignment dimension the arms are:
  base           the answer without the instruction (it is also the initial answer the judge scores),
  prompt-only    the instruction in the prompt, a = 0, fixed temperature,
  steering-only  judge-derived a, fixed temperature T0 (left out when the sda arm's temperature is fixed too:
                 it would be the same answer),
  sda            judge-derived a, the run's steering and temperature (by default the guarded steering at T0;
                 ``--steering paper --temperature-mode paper`` is the paper's method).
SDA is judged pairwise against every other arm: both answers scored 1-100 in one judge call, their order
shuffled with a recorded seed; win/loss/tie, gain omega = (wins - losses) / (wins + losses + ties), judge
failures left out of the denominator and counted.

Verifiable instructions (``verifiable.py``) apply a checkable instruction to any queries and report the
compliance rate per arm, with no judge at all: there the amplifier is fixed (``verify_strength``).

Every answer and judgement is appended to the run file (JSONL) and flushed as soon as it exists; a run
resumes from its file without redoing work (a partial last line, from a crash mid-write, is cut off).
Resuming retries the judgements that failed (initial scores and pairs) and appends the new attempts: the
file keeps every attempt, the latest one counts. Unit keys carry a hash of the data file's resolved path,
so two files with the same name never share answers; dataset and dimension are record fields, never
parsed back out of a key (a dimension may contain ":"). Item i uses the seed ``derive_seed(seed, i)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from .charts import pyplot
from .datasets import PAPER_OMEGA, load_dataset
from ..errors import InputError, ModelError
from ..judging import JudgeError
from ..jsonl import Appender, read_complete, read_repaired
from ..judging.verifier import FIRST_PROMPTED, first_answer_mode
from ..pipeline import judge_amplifier, steered_settings
from ..prompts import resolve_alignment
from ..rubrics import rubric_for
from ..seeds import check_seed, derive_seed
from ..shards import Shard
from . import ifeval, quality
from ..engine.fusion import DEFAULT_TEMPERATURE_MODE, TEMPERATURE_MODES
from ..engine.steering import DEFAULT_STEERING, PAPER, Steering
from .verifiable import VERIFIABLE

ARMS = ("base", "prompt-only", "steering-only", "sda")
# Arms of the verifiable metric only: "paper" is the paper's formula at a = FIXED_STRENGTH (beside the default
# steering); "sda-fixed" (with --verify-strength judge) the run's steering at that a.
VERIFY_ONLY_ARMS = ("paper", "sda-fixed")
FIXED_STRENGTH = 0.5  # the "sda-fixed" arm of --verify-strength judge
RUN_VERSION = 2  # 2: unit keys carry the data file's path hash; version 1 files resume with their own keys


@dataclass
class EvalConfig:
    datasets: List[dict]  # {"path", "query_field", "dimensions"}
    arms: List[str] = field(default_factory=lambda: list(ARMS))
    offset: int = 0
    limit: Optional[int] = None
    sample: Optional[int] = None
    seed: int = 0
    max_tokens: int = 128
    judge: str = "local"  # the CLI's default: local, which can compare two answers; self with verify_only
    judge_url: Optional[str] = None  # without user:pass@ (the CLI strips them: this config is recorded)
    judge_options: dict = field(default_factory=dict)  # make_judge's remote options (read_timeout, ...)
    amplifier_map: str = "sigmoid"
    failure_strength: float = 0.5  # a when the judge fails on an initial answer
    verify: List[str] = field(default_factory=list)  # verifiable instruction ids
    verify_limit: int = 30
    verify_strength: Union[float, str] = 0.5  # or "judge": the full pipeline (initial answer, judge, a)
    model: Optional[str] = None
    verify_only: bool = False  # no judged protocol, only the verifiable instructions
    steering: Optional[dict] = None  # Steering fields of the steered arms; None: DEFAULT_STEERING
    temperature_mode: Optional[str] = None  # of the sda and sda-fixed arms; None: DEFAULT_TEMPERATURE_MODE
    fluency: bool = True  # the verifiable metric's answers are teacher-forced for their fluency
    shard: Optional[List[int]] = None  # [I, N]: only the units of shard I of N (shards.py); None: all
    # The engine's KV cache settings (cache_type_k, cache_type_v, flash_attn): answers of one run come from one
    # setting, so --resume keeps them. None: an older run file, made with the defaults (f16, auto).
    kv_cache: Optional[dict] = None

    @property
    def steering_obj(self) -> Steering:
        return DEFAULT_STEERING if self.steering is None else Steering(**self.steering)

    def check(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS + VERIFY_ONLY_ARMS]
        if unknown or not self.arms:
            raise InputError(f"unknown arm(s) {', '.join(unknown) or '(none)'} (choose from "
                             f"{', '.join(ARMS + VERIFY_ONLY_ARMS)})")
        if not self.verify_only and any(a in VERIFY_ONLY_ARMS for a in self.arms):
            raise InputError("the paper and sda-fixed arms belong to the verifiable metric: add --verify-only")
        bad = [v for v in self.verify if v not in VERIFIABLE and not ifeval.is_ifeval(v)]
        if bad:
            raise InputError(f"unknown verifiable instruction(s) {', '.join(bad)} (choose from {', '.join(VERIFIABLE)}, "
                             "ifeval (all 25 IFEval types) or ifeval:TYPE, e.g. ifeval:punctuation:no_comma)")
        if any(ifeval.is_ifeval(v) for v in self.verify):
            ifeval.make_case(ifeval.TYPES[0], "q", 0)  # the package is there (a one-line error otherwise)
        self.steering_obj.check()
        if self.temperature_mode is not None and self.temperature_mode not in TEMPERATURE_MODES:
            raise InputError(f"unknown temperature mode {self.temperature_mode!r}")
        if not self.datasets:
            raise InputError("no dataset given (--dataset PATH)")
        if all(a == "sda" for a in self.arms):  # both metrics compare SDA with the other arms
            raise InputError("--arms sda alone leaves nothing to compare SDA with: "
                             "add base, prompt-only and/or steering-only")
        if self.verify_only and not self.verify:
            raise InputError("--verify-only needs --verify")
        if isinstance(self.verify_strength, str) and self.verify_strength != "judge":
            raise InputError(f"--verify-strength must be a number >= 0 or judge, got {self.verify_strength!r}")
        kind = self.judge.strip().lower()
        if kind in ("self", "auto", "verify") and not self.verify_only:
            raise InputError(f"--judge {kind} sets amplifiers but cannot compare two answers, which the judged "
                             "protocol does: add --verify-only, or use --judge local or openai")
        check_seed(self.seed, "--seed")
        if self.shard is not None:
            Shard(*self.shard)  # recorded by the CLI from parse_shard: [I, N] with 0 <= I < N

    def resolve_defaults(self) -> None:
        """Write the defaults into the config, so that a resumed run keeps them whatever later versions default to."""
        if self.steering is None:
            self.steering = DEFAULT_STEERING.to_dict()
        if self.temperature_mode is None:
            self.temperature_mode = DEFAULT_TEMPERATURE_MODE

    @property
    def sda_temperature(self) -> str:
        return self.temperature_mode or DEFAULT_TEMPERATURE_MODE

    def active_arms(self, arms: List[str]) -> List[str]:
        """steering-only is the sda arm itself when that runs at the fixed temperature: left out."""
        return [a for a in arms if not (a == "steering-only" and self.sda_temperature == "fixed")]

    @property
    def verify_arms(self) -> List[str]:
        """The verifiable metric's arms: with --verify-strength judge, "sda-fixed" (a = FIXED_STRENGTH) runs
        beside the pipeline's own a, so that the judge's a is compared with a fixed one."""
        arms = [a for a in self.active_arms([a for a in ARMS + ("paper",) if a in self.arms and a != "sda"])]
        # With the judge, sda-fixed runs beside the pipeline's a unless the arms were chosen without it.
        if self.verify_strength == "judge" and ("sda-fixed" in self.arms or set(self.arms) == set(ARMS)):
            arms.append("sda-fixed")
        return arms + ["sda"]


class RunFile:
    """Append-only JSONL record of a run: a header line, then answers, scores, judgements, checks."""

    def __init__(self, path: Path, config: Optional[EvalConfig] = None, *, read_only: bool = False):
        """``config``: a new run; None: resume ``path`` (``read_only``: only read it, as merge does)."""
        self.path = path
        self._read_only = read_only
        self.records: List[dict] = []
        self.version = RUN_VERSION
        if config is None:  # resume
            self.config = self._load()
        else:
            config.resolve_defaults()
            if path.exists() and path.stat().st_size > 0:
                raise InputError(f"{path} already holds a run: use --resume {path}, or choose another file")
            self.config = config
        self._out = None if read_only else Appender(path)
        if config is not None:
            self.append({"type": "run", "version": RUN_VERSION, "config": config.__dict__})

    def _load(self) -> EvalConfig:
        try:
            # A crash mid-write: the partial record is dropped, and redone (only in memory when read-only).
            data = read_complete(self.path) if self._read_only else read_repaired(self.path)
        except OSError as exc:
            raise InputError(f"cannot read run file {self.path}: {exc.strerror}") from None
        lines = data.splitlines()
        try:
            header = json.loads(lines[0])
            if header.get("type") != "run":
                raise ValueError("no run header")
            if header.get("version") not in (1, RUN_VERSION):
                raise InputError(f"{self.path} is a run file of another sda-local version "
                                 f"(format {header.get('version')!r}; this one reads 1 and {RUN_VERSION})")
            self.version = header["version"]
            fields = dict(header["config"])
            fields.setdefault("steering", PAPER.to_dict())  # runs from before the steering option: the paper's
            fields.setdefault("temperature_mode", "paper")  # and its temperature
            config = EvalConfig(**fields)
            self.records = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path} is not a sda-local eval run file ({exc})") from None
        return config

    def append(self, record: dict) -> None:
        self._out.append(record)
        if record.get("type") != "run":
            self.records.append(record)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def merge_runs(paths: List[Path], out: Path) -> Tuple[RunFile, List[int]]:
    """One run file from the run files of ``--shard`` runs of one evaluation: the same settings but the
    shard, each shard once. Returns the merged run (closed) and the shard indexes none of ``paths`` had."""
    runs, seen = [], {}
    for path in paths:
        runs.append(RunFile(path, read_only=True))  # a shard still being written is left as it is
    first = dict(runs[0].config.__dict__, shard=None)
    count = None
    for path, run in zip(paths, runs):
        if dict(run.config.__dict__, shard=None) != first or run.version != runs[0].version:
            raise InputError(f"{path} is a run with other settings than {paths[0]}: only the shards of one run merge")
        if run.config.shard is None:
            raise InputError(f"{path} is a whole run, not a shard (--shard I/N)")
        index, n = run.config.shard
        if count is not None and n != count:
            raise InputError(f"{path} is shard {index}/{n}, {paths[0]} one of {count}")
        count = n
        if index in seen:
            raise InputError(f"{path} and {seen[index]} are both shard {index}/{n}")
        seen[index] = path
    config = EvalConfig(**first)
    merged = RunFile(out, config)
    try:
        for run in runs:
            for record in run.records:
                merged.append(record)
    finally:
        merged.close()
    return merged, [i for i in range(count) if i not in seen]


class Progress:
    """One status line on a terminal (\\r-updated), with an ETA from the units done in this session."""

    def __init__(self, total: int, done: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, done, stream
        self.start, self.session_done = time.monotonic(), 0
        self.tty = stream.isatty()

    def advance(self, label: str) -> None:
        self.done += 1
        self.session_done += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.session_done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s  {label}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()
        elif self.done == self.total or self.session_done % 10 == 1:
            self.stream.write(line + "\n")

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _outcome(score_sda: float, score_other: float, margin: float = 0.0) -> str:
    """win, loss, or tie when the scores differ by no more than ``margin``."""
    if abs(score_sda - score_other) <= margin:
        return "tie"
    return "win" if score_sda > score_other else "loss"


class JudgedUnit(NamedTuple):
    key: str
    dataset: str  # its name in the summary
    dimension: str
    index: int  # item index in the data file
    seed: int
    query: str


def _file_id(path) -> str:
    """A short hash of the resolved path: two files with the same name get different unit keys."""
    return hashlib.sha256(os.fsencode(str(Path(path).resolve()))).hexdigest()[:8]


def _key_prefix(name: str, path, key_version: int) -> str:
    return name if key_version == 1 else f"{name}#{_file_id(path)}"


def judged_units(c: EvalConfig, key_version: int = RUN_VERSION) -> List[JudgedUnit]:
    """Each item and dimension of the judged protocol (``key_version`` 1: the keys of version 1 run files)."""
    loaded, seen = [], set()
    for spec in c.datasets:
        file_id = _file_id(spec["path"])
        if file_id in seen:  # the same file given twice: its units once
            continue
        seen.add(file_id)
        loaded.append(load_dataset(spec["path"], query_field=spec.get("query_field"),
                                   dimensions=spec.get("dimensions") or (), offset=c.offset, limit=c.limit,
                                   sample=c.sample, seed=c.seed))
    names = [ds.name for ds in loaded]
    units = []
    for ds in loaded:
        label = ds.name if names.count(ds.name) == 1 or key_version == 1 else str(ds.path)
        prefix = _key_prefix(ds.name, ds.path, key_version)
        for dimension in ds.dimensions:
            for index, query in ds.items:
                units.append(JudgedUnit(f"{prefix}:{dimension}:{index}", label, dimension, index,
                                        derive_seed(c.seed, index), query))
    return units


def verify_units(c: EvalConfig, key_version: int = RUN_VERSION) -> List[Tuple[str, str, int, str]]:
    """(key, instruction id, seed, query): each verifiable instruction over the first data set's queries."""
    if not c.verify:
        return []
    spec = c.datasets[0]
    ds = load_dataset(spec["path"], query_field=spec.get("query_field"), dimensions=spec.get("dimensions") or (),
                      offset=c.offset, limit=c.verify_limit, seed=c.seed)
    prefix = _key_prefix(ds.name, ds.path, key_version)
    return [(f"verify:{vid}:{prefix}:{index}", vid, derive_seed(c.seed, index), query)
            for vid in c.verify for index, query in ds.items]


class Evaluation:
    def __init__(self, engine, judge, run: RunFile, *, on_event: Callable[[str], None] = lambda m: None):
        self.engine, self.judge, self.run, self.config = engine, judge, run, run.config
        self.on_event = on_event
        self.failed_units = 0  # units whose generation failed in this session (left for --resume)
        self.answers: Dict[Tuple[str, str], dict] = {}
        self.scores: Dict[str, dict] = {}
        self.pairs: Dict[Tuple[str, str], dict] = {}
        self.checks: Dict[Tuple[str, str], dict] = {}
        self._position: Dict[Tuple[str, str, str], int] = {}  # (type, key, arm) -> place of the latest record
        self._count = 0
        self._base_by_query: Dict[Tuple[str, int], dict] = {}
        self._lock = threading.RLock()
        for r in run.records:
            self._index(r)

    def _index(self, r: dict) -> None:
        # Later records replace earlier ones: a retried judgement or a regenerated answer is the one that counts.
        kind = r.get("type")
        self._position[(kind, r.get("key"), r.get("arm"))] = self._count
        self._count += 1
        if kind == "answer":
            self.answers[(r["key"], r["arm"])] = r
        elif kind == "score":
            self.scores[r["key"]] = r
        elif kind == "pair":
            self.pairs[(r["key"], r["arm"])] = r
        elif kind == "check":
            self.checks[(r["key"], r["arm"])] = r

    def _record(self, r: dict) -> dict:
        with self._lock:  # units may run in several threads (execute(parallel=N))
            self.run.append(r)
            self._index(r)
        return r

    # -- work -----------------------------------------------------------------------------------------
    def _answer(self, key: str, arm: str, query: str, instruction: Optional[str], seed: int, **options) -> dict:
        done = self.answers.get((key, arm))
        # An answer made with another amplifier (the judge failed, then a retry scored it) is stale.
        if done is not None and ("strength" not in options or done["stats"].get("strength") == options["strength"]):
            return done
        r = self.engine.generate(query, instruction, seed=seed, max_tokens=self.config.max_tokens, **options)
        return self._record({"type": "answer", "key": key, "arm": arm, "text": r.text,
                             "stats": r.stats.to_dict()})

    def _initial_score(self, key: str, query: str, alignment, base_text: str) -> dict:
        done = self.scores.get(key)
        if done is not None and done["score"] is not None:  # a failed judgement is retried
            return done
        # The pipeline's own judging step (the same a, the same failure policy: a fixed a, retried on --resume).
        choice = judge_amplifier(self.judge, query, base_text, alignment, amplifier_map=self.config.amplifier_map,
                                 on_judge_failure=f"fixed:{self.config.failure_strength}")
        j = choice.judgement
        if j is not None:
            record = {"score": j.score, "amplifier": choice.amplifier, "judge": j.judge,
                      "rubric_version": j.rubric_version, "scoring": j.scoring, "spread": j.spread}
        else:
            record = {"score": None, "amplifier": choice.amplifier, "judge_failure": choice.failure,
                      "rubric_version": choice.rubric_version}
            self.on_event(f"{key}: judge failed on the initial answer ({choice.failure}); a = {choice.amplifier:g} "
                          "(--resume retries it)")
        return self._record({"type": "score", "key": key, **record})

    def _pair_current(self, key: str, arm: str) -> bool:
        """A successful judgement of the answers as they are now (none of them regenerated since)."""
        done = self.pairs.get((key, arm))
        if done is None or done["outcome"] == "failure":
            return False
        at = self._position[("pair", key, arm)]
        return all(self._position.get(("answer", key, a), at) < at for a in ("sda", arm))

    def _pair(self, unit: JudgedUnit, arm: str, alignment, sda_text: str, other_text: str) -> dict:
        key, query = unit.key, unit.query
        if self._pair_current(key, arm):
            return self.pairs[(key, arm)]
        # Independent of where the file lies, so the order of a unit does not move with its data.
        order_seed = f"{self.config.seed}:{unit.dataset}:{unit.dimension}:{unit.index}:{arm}"
        sda_first = random.Random(order_seed).random() < 0.5
        a, b = (sda_text, other_text) if sda_first else (other_text, sda_text)
        record = {"type": "pair", "key": key, "arm": arm, "dataset": unit.dataset, "dimension": unit.dimension,
                  "order_seed": order_seed, "sda_first": sda_first}
        try:
            j = self.judge.score_pair(query, a, b, rubric_for(alignment))
            score_sda, score_other = (j.score_a, j.score_b) if sda_first else (j.score_b, j.score_a)
            record.update(score_sda=score_sda, score_other=score_other,
                          outcome=_outcome(score_sda, score_other, j.tie_margin), judge=j.judge,
                          rubric_version=j.rubric_version)
        except JudgeError as exc:
            record.update(outcome="failure", failure=str(exc))
            self.on_event(f"{key}: judge failed on SDA vs {arm} ({exc}); --resume retries it")
        return self._record(record)

    def run_judged(self, unit: JudgedUnit) -> None:
        key, dimension, seed, query = unit.key, unit.dimension, unit.seed, unit.query
        alignment = resolve_alignment(dimension)
        arms = self.config.active_arms(self.config.arms)
        steering = self.config.steering_obj
        temperature = self.config.sda_temperature
        base = self._answer(key, "base", query, None, seed, system=alignment.system)
        score = self._initial_score(key, query, alignment, base["text"])
        a = score["amplifier"]
        texts = {"base": base["text"]}
        if "prompt-only" in arms:
            texts["prompt-only"] = self._answer(key, "prompt-only", query, dimension, seed, strength=0.0,
                                                temperature_mode="fixed")["text"]
        if "steering-only" in arms:
            texts["steering-only"] = self._answer(key, "steering-only", query, dimension, seed, strength=a,
                                                  temperature_mode="fixed", steering=steering)["text"]
        texts["sda"] = self._answer(key, "sda", query, dimension, seed, strength=a, temperature_mode=temperature,
                                    steering=steering)["text"]
        for arm in arms:
            if arm != "sda":
                self._pair(unit, arm, alignment, texts["sda"], texts[arm])

    def run_verify(self, key: str, vid: str, seed: int, query: str) -> None:
        instruction, check, required, kwargs = self._verifiable(vid, query, seed)
        arms = self.config.verify_arms
        s = self.config.verify_strength
        steering = judged_steering = self.config.steering_obj
        temperature = self.config.sda_temperature
        alignment = resolve_alignment(instruction)
        prompted = s == "judge" and first_answer_mode(self.judge, alignment) == FIRST_PROMPTED
        base = self._base_answer(key, query, seed) if "base" in arms or (s == "judge" and not prompted) else None
        prompt_only = dict(strength=0.0, temperature_mode="fixed")
        if s == "judge":  # the pipeline: the judge reads the initial answer and sets a
            # The initial answer is the base answer, or for a judge that checks the instruction by program the
            # prompted one (a = 0): the prompt-only arm's answer, the same request as the pipeline's.
            initial = self._answer(key, "prompt-only", query, instruction, seed, **prompt_only) if prompted else base
            s = self._initial_score(key, query, alignment, initial["text"])["amplifier"]
            # As the pipeline: the steered answer after a prompted first answer.
            judged_steering, temperature = steered_settings(FIRST_PROMPTED if prompted else None, s, steering,
                                                            temperature)
        plans = {"prompt-only": prompt_only,
                 "steering-only": dict(strength=s, temperature_mode="fixed", steering=judged_steering),
                 "paper": dict(strength=FIXED_STRENGTH, temperature_mode="paper", steering=PAPER),
                 "sda-fixed": dict(strength=FIXED_STRENGTH, temperature_mode=self.config.sda_temperature,
                                   steering=steering),
                 "sda": dict(strength=s, temperature_mode=temperature, steering=judged_steering)}
        for arm in arms:
            if arm == "base":
                text = base["text"]
            else:
                text = self._answer(key, arm, query, instruction, seed, **plans[arm])["text"]
            check_record = self.checks.get((key, arm))
            at = self._position.get(("check", key, arm), -1)
            if check_record is None or self._position.get(("answer", key, arm), -1) > at:  # none yet, or stale
                echo = quality.echo(text, instruction, query, required)
                degeneration = quality.degeneration(text)
                record = {"type": "check", "key": key, "arm": arm, "instruction": vid, "complied": check(text),
                          "echo": echo.echoed, "echo_share": round(echo.share, 4),
                          "degenerate": degeneration.degenerate,
                          "fluency": self._fluency(query, instruction, text) if self.config.fluency else None}
                if kwargs is not None:
                    record["instruction_text"], record["kwargs"] = instruction, kwargs
                self._record(record)

    @staticmethod
    def _verifiable(vid: str, query: str, seed: int):
        """(instruction text, check, texts the answer is asked to write out, IFEval arguments or None)."""
        if ifeval.is_ifeval(vid):
            case = ifeval.make_case(vid, query, seed)
            return case.instruction, case.check, case.required_texts(), case.kwargs
        v = VERIFIABLE[vid]
        return v.instruction, v.check, (), None

    def _fluency(self, query: str, instruction: str, text: str) -> Optional[float]:
        return quality.fluency(self.engine, query, instruction, text)

    def _base_answer(self, key: str, query: str, seed: int) -> dict:
        """The answer without the instruction. It depends on the query and seed alone, so every instruction's
        unit of one query shares it (generated once, recorded under each key)."""
        done = self.answers.get((key, "base"))
        if done is not None:
            return done
        with self._lock:
            shared = self._base_by_query.get((query, seed))
            mine = shared is None
            if mine:  # the first unit of this query generates it; units running beside it wait for it
                shared = self._base_by_query[(query, seed)] = _Pending()
        if mine:
            try:
                record = self._answer(key, "base", query, None, seed)
            except BaseException:
                with self._lock:
                    del self._base_by_query[(query, seed)]
                shared.set(None)
                raise
            self._base_by_query[(query, seed)] = record
            shared.set(record)
            return record
        if isinstance(shared, _Pending):
            shared = shared.wait()
            if shared is None:  # the generating unit failed: this one tries itself
                return self._base_answer(key, query, seed)
        return self._record({**shared, "key": key})

    def execute(self, parallel: int = 1) -> None:
        """Run every unit not complete yet. ``parallel`` > 1 runs that many units at once in threads: their
        generations share the engine's batched decode, and each unit's answers are the same as alone."""
        all_judged = [] if self.config.verify_only else judged_units(self.config, self.run.version)
        all_verify = verify_units(self.config, self.run.version)
        if self.config.shard is not None:
            shard = Shard(*self.config.shard)
            all_judged = [u for u in all_judged if shard.holds(u.key)]
            all_verify = [u for u in all_verify if shard.holds(u[0])]
        work = [(u.key, self.run_judged, (u,)) for u in all_judged if not self._judged_complete(u.key)]
        work += [(u[0], self.run_verify, u) for u in all_verify if not self._verify_complete(u[0])]
        total = len(all_judged) + len(all_verify)
        progress = Progress(total, total - len(work))
        if parallel <= 1:
            for key, run, args in work:
                self._guarded(key, run, *args)
                progress.advance(key)
        else:
            pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sda-eval")
            try:
                futures = {pool.submit(self._guarded, key, run, *args): key for key, run, args in work}
                for future in as_completed(futures):
                    future.result()
                    progress.advance(futures[future])
            except BaseException:
                self.engine.scheduler.stop()  # the running units end at the next step; --resume redoes them
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        progress.finish()

    def _guarded(self, key: str, run, *args) -> None:
        """Run one unit; a generation that fails (e.g. non-finite logits) fails this unit only. It is
        recorded and reported, and stays incomplete, so that --resume retries it."""
        try:
            run(*args)
        except ModelError as exc:
            self._record({"type": "unit_failure", "key": key, "error": str(exc)})
            self.on_event(f"{key}: generation failed ({exc}); unit left out")
            self.failed_units += 1

    def _judged_complete(self, key: str) -> bool:
        score = self.scores.get(key)
        if score is None or score["score"] is None:
            return False
        steered = [self.answers.get((key, arm)) for arm in ("steering-only", "sda")
                   if arm == "sda" or arm in self.config.active_arms(self.config.arms)]
        if any(r is None or r["stats"].get("strength") != score["amplifier"] for r in steered):
            return False
        return all(self._pair_current(key, arm) for arm in self.config.active_arms(self.config.arms) if arm != "sda")

    def _verify_complete(self, key: str) -> bool:
        if self.config.verify_strength == "judge":
            score = self.scores.get(key)
            if score is None or score["score"] is None:  # a failed judgement is retried
                return False
            if any(self.answers.get((key, arm), {}).get("stats", {}).get("strength") != score["amplifier"]
                   for arm in ("steering-only", "sda") if arm in self.config.verify_arms):
                return False
        return all((key, arm) in self.checks for arm in self.config.verify_arms)


class _Pending:
    """A base answer that another unit is generating."""

    def __init__(self):
        self._event = threading.Event()
        self._value = None

    def set(self, value) -> None:
        """The record, or None when its generation failed."""
        self._value = value
        self._event.set()

    def wait(self):
        self._event.wait()
        return self._value


# -- summary -----------------------------------------------------------------------------------------------
def summarize(records: Iterable[dict]) -> dict:
    """Per dataset / dimension / arm: wins, losses, ties, failures, omega; per arm: compliance.

    Each unit counts once: where the file holds several attempts (a retried judgement), the latest."""
    judged: Dict[str, Dict[str, Dict[str, dict]]] = {}
    compliance: Dict[str, Dict[str, List[bool]]] = {}
    latest: Dict[Tuple[str, str, str], dict] = {}
    for r in records:
        if r.get("type") in ("pair", "check"):
            latest[(r["type"], r["key"], r["arm"])] = r
    for r in latest.values():
        if r.get("type") == "pair":
            if "dimension" in r:
                dataset, dimension = r["dataset"], r["dimension"]
            else:  # version 1 records: key "dataset:dimension:index"
                dataset, rest = r["key"].split(":", 1)
                dimension = rest.rsplit(":", 1)[0]
            cell = judged.setdefault(dataset, {}).setdefault(dimension, {}).setdefault(
                r["arm"], {"wins": 0, "losses": 0, "ties": 0, "failures": 0})
            cell[{"win": "wins", "loss": "losses", "tie": "ties", "failure": "failures"}[r["outcome"]]] += 1
        elif r.get("type") == "check":
            compliance.setdefault(r["instruction"], {}).setdefault(r["arm"], []).append(r)
    for dataset in judged.values():
        for dimension in dataset.values():
            for cell in dimension.values():
                n = cell["wins"] + cell["losses"] + cell["ties"]
                cell["omega"] = (cell["wins"] - cell["losses"]) / n if n else None
    amplifiers: Dict[str, List[float]] = {}
    scores = {r["key"]: r for r in records if r.get("type") == "score" and r.get("key", "").startswith("verify:")}
    for key, r in scores.items():  # "verify:VID:PREFIX:INDEX", and an IFEval VID has colons of its own
        amplifiers.setdefault(key[len("verify:"):].rsplit(":", 2)[0], []).append(r["amplifier"])
    per_arm: Dict[str, List[dict]] = {}
    verifiable = {}
    for vid, arms in compliance.items():
        verifiable[vid] = {arm: _check_cell(v) for arm, v in arms.items()}
        for arm, v in arms.items():
            per_arm.setdefault(arm, []).extend(v)
    overall = {arm: _check_cell(v) for arm, v in per_arm.items()}
    judged_amplifiers = {vid: {"mean": sum(v) / len(v), "n": len(v), "zero": sum(x < 0.005 for x in v)}
                         for vid, v in amplifiers.items()}
    return {"judged": judged, "verifiable": verifiable, "verifiable_overall": overall,
            "verifiable_amplifiers": judged_amplifiers}


def _check_cell(checks: List[dict]) -> dict:
    """Compliance, and where the checks carry them (runs since the quality metrics), echo rate, mean echo share,
    degeneration rate and mean fluency, over one cell's checks."""
    n = len(checks)
    cell = {"compliance": sum(bool(c["complied"]) for c in checks) / n, "n": n}
    if all("echo" in c for c in checks):
        cell["echo"] = sum(bool(c["echo"]) for c in checks) / n
        cell["echo_share"] = sum(c["echo_share"] for c in checks) / n
        cell["degenerate"] = sum(bool(c["degenerate"]) for c in checks) / n
        fluency = [c["fluency"] for c in checks if c.get("fluency") is not None]
        cell["fluency"] = sum(fluency) / len(fluency) if fluency else None
        cell["clean"] = (sum(quality.clean(c["complied"], c["echo"], c["degenerate"], c.get("fluency"))
                             for c in checks) / n) if fluency else None
    return cell


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def summary_markdown(summary: dict) -> str:
    lines = ["| dataset | dimension | SDA vs | omega | wins | losses | ties | failures | paper (vs base) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, dims in summary["judged"].items():
        for dimension, arms in dims.items():
            for arm, c in arms.items():
                paper = PAPER_OMEGA.get((dataset, dimension)) if arm == "base" else None
                lines.append(f"| {dataset} | {dimension} | {arm} | {_pct(c['omega'])} | {c['wins']} | {c['losses']} "
                             f"| {c['ties']} | {c['failures']} | {'-' if paper is None else f'{paper:+.1f}%'} |")
    if summary["verifiable"]:
        arms = [a for a in ARMS[:-1] + ("paper", "sda-fixed", "sda") if a in summary["verifiable_overall"]]
        amplifiers = summary.get("verifiable_amplifiers") or {}
        judged_a = bool(amplifiers)
        extra = " mean a (a = 0) |" if judged_a else ""
        lines += ["", "| verifiable instruction | " + " | ".join(arms) + " |" + extra,
                  "|---|" + "---|" * (len(arms) + bool(judged_a))]
        for vid, cells in summary["verifiable"].items():
            row = f"| {vid} | " + " | ".join(f"{100 * cells[a]['compliance']:.0f}% (n={cells[a]['n']})"
                                            if a in cells else "-" for a in arms) + " |"
            if judged_a:
                amp = amplifiers.get(vid)
                row += f" {amp['mean']:.2f} ({amp['zero']}/{amp['n']}) |" if amp else " - |"
            lines.append(row)
        overall = summary["verifiable_overall"]
        lines.append("| **all** | " + " | ".join(f"**{100 * overall[a]['compliance']:.0f}%**" for a in arms) + " |"
                     + (" |" if judged_a else ""))
        if all("echo" in overall[a] for a in arms):
            lines += ["", "Quality per arm: compliance / echo / degenerate (%), fluency (mean log-prob per token "
                      "without the instruction), clean compliance (%: complied, no echo, no loop, fluency >= "
                      f"{quality.CLEAN_FLUENCY:g})", "",
                      "| verifiable instruction | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
            rows = list(summary["verifiable"].items()) + [("**all**", overall)]
            for vid, cells in rows:
                lines.append(f"| {vid} | " + " | ".join(_quality_text(cells[a]) if a in cells else "-"
                                                      for a in arms) + " |")
    return "\n".join(lines)


def _quality_text(cell: dict) -> str:
    if "echo" not in cell:
        return f"{100 * cell['compliance']:.0f} / - / -"
    fluency = "-" if cell["fluency"] is None else f"{cell['fluency']:.2f}"
    clean = "-" if cell.get("clean") is None else f"{100 * cell['clean']:.0f}"
    return (f"{100 * cell['compliance']:.0f} / {100 * cell['echo']:.0f} / {100 * cell['degenerate']:.0f}, "
            f"{fluency}, {clean}")


def write_chart(summary: dict, path: Path) -> bool:
    """PNG of omega (SDA vs base) per dataset/dimension beside the paper's Table 1; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    labels, ours, paper = [], [], []
    for dataset, dims in summary["judged"].items():
        for dimension, arms in dims.items():
            if "base" in arms and arms["base"]["omega"] is not None:
                labels.append(f"{dataset}\n{dimension}")
                ours.append(100 * arms["base"]["omega"])
                paper.append(PAPER_OMEGA.get((dataset, dimension), math.nan))
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="sda-local (this run)")
    ax.bar([i + 0.2 for i in x], paper, width=0.4, label="paper, Table 1 (average of 8 models)", alpha=0.6)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("gain omega of SDA vs base (%)")
    ax.set_title("SDA vs base: (wins - losses) / (wins + losses + ties)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
