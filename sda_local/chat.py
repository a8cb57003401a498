"""Multi-turn chat with SDA on every turn: the session behind ``sda-local chat``.

Both streams hold the whole conversation (every user turn of the with-stream carries the instruction), so
each turn prefills only its new tokens. Near the context limit the oldest turns are dropped from both
streams, and the user is told. Slash commands change the settings between turns.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from .amplifier import AMPLIFIER_MAPS
from .engine.fusion import DEFAULT_TEMPERATURE_MODE
from .errors import InputError, SDAError
from .judging import DEFAULT_JUDGE, RemoteJudge, format_score, make_judge, redact_url
from .logs import LogWriteError
from .pipeline import DEFAULT_STRENGTH, align_stream, parse_failure_policy
from .privacy import write_private_text
from .prompts import check_text, resolve_alignment
from .seeds import derive_seed

TRANSCRIPT_VERSION = 1
HELP = """Commands:
  /align PRESET|TEXT|off   steer towards a preset (helpfulness, harmlessness, honesty, empathy,
                           summarization) or an instruction of your own; off = plain chat
  /strength A|auto         amplifier a set by hand, or auto: the judge scores a first answer each turn
  /judge auto|self|verify|local|openai[:MODEL]|none   who sets a in auto mode (auto: a program's check of
                           a verifiable instruction, else self: the model's likelihood ratio)
  /show                    last score, a, mean temperature, mean JS, tok/s, SDA overhead
  /clear                   forget the conversation
  /save FILE, /load FILE   JSON transcript with all settings
  /help, /bye              this help; quit (or Ctrl-D)
  \"\"\"                      starts and ends a multi-line message
Ctrl-C interrupts a reply (the partial reply stays in the conversation)."""


class ChatExit(Exception):
    """/bye."""


@dataclass
class Turn:
    user: str
    reply: str
    interrupted: bool = False
    score: Optional[float] = None
    amplifier: Optional[float] = None
    stats: Optional[dict] = None


@dataclass
class ChatSettings:
    align: Optional[str] = None  # preset name or instruction text; None = plain chat
    strength: Optional[float] = None  # None = auto (judge)
    judge: str = DEFAULT_JUDGE
    judge_url: Optional[str] = None
    system: Optional[str] = None
    seed: Optional[int] = None
    max_tokens: int = 512
    temperature_mode: str = DEFAULT_TEMPERATURE_MODE
    amplifier_map: str = "sigmoid"
    on_judge_failure: str = f"fixed:{DEFAULT_STRENGTH}"
    judge_options: Optional[dict] = None  # make_judge's remote options (read_timeout, max_attempts, ...)
    # The judge URL as given, user:pass@ included. A plain attribute, not a dataclass field, so that asdict()
    # (the conversation log, /save) never records it; judge_url holds the same URL without them.
    judge_url_with_credentials = None

    def __post_init__(self):  # a /load'ed transcript comes through here too
        if self.judge_options is not None and not isinstance(self.judge_options, dict):
            raise ValueError(f"judge_options must be a JSON object, got {self.judge_options!r}")
        if self.judge_url is not None and not isinstance(self.judge_url, str):
            raise ValueError(f"judge_url must be text, got {self.judge_url!r}")
        if self.judge_url is not None and redact_url(self.judge_url) != self.judge_url:
            self.judge_url_with_credentials, self.judge_url = self.judge_url, redact_url(self.judge_url)


@dataclass
class LastTurnInfo:
    score: Optional[float] = None
    scoring: Optional[str] = None
    amplifier: Optional[float] = None
    amplifier_source: Optional[str] = None
    stats: Optional[dict] = None
    plain_tokens_per_second: Optional[float] = None  # the latest one-stream generation of this session
    dropped: int = 0


class ChatSession:
    def __init__(self, engine, settings: ChatSettings, *, say: Callable[[str], None] = print, log=None):
        self.engine = engine
        self.settings = settings
        self.say = say
        self.log = log
        self.turns: List[Turn] = []
        self.info = LastTurnInfo()
        self.conversation_id = uuid.uuid4().hex
        self.turns_started = 0  # never decreases (turns dropped from the context still count): seeds never repeat
        self._unlogged: List[dict] = []  # turns the log refused (locked, disk full): retried at the next turn
        self._judge = None
        self._judge_spec: Optional[Tuple[str, Optional[str]]] = None
        self._model_sha256 = log.model_sha256(engine.model_path) if log is not None else None
        if settings.align is not None:
            resolve_alignment(settings.align)  # fail early on a typo
        parse_failure_policy(settings.on_judge_failure)
        if settings.align is not None and settings.strength is None:
            self._ensure_judge()

    # -- judge ----------------------------------------------------------------------------------------
    def _ensure_judge(self):
        spec = (self.settings.judge, self.settings.judge_url)
        if self._judge_spec != spec:
            self.close_judge()
            url, given = spec[1], self.settings.judge_url_with_credentials
            if url is not None and given is not None and redact_url(given) == url:
                url = given
            self._judge = make_judge(spec[0], self.engine, url=url, **(self.settings.judge_options or {}))
            self._judge_spec = spec
            if isinstance(self._judge, RemoteJudge):
                self.say(f"note: answers are sent to {self._judge.url} for judging")
        return self._judge

    def close_judge(self) -> None:
        if self._judge is not None:
            self._judge.close()
        self._judge, self._judge_spec = None, None

    # -- turns ----------------------------------------------------------------------------------------
    def _history(self) -> List[Tuple[str, str]]:
        return [(t.user, t.reply) for t in self.turns]

    def _fit_context(self, message: str) -> None:
        """Drop the oldest turns until the prompts leave room for a reply; tell the user."""
        reserve = min(self.settings.max_tokens, self.engine.n_ctx // 2)
        dropped = 0
        while True:
            longest = max(self.engine.prompt_lengths(message, self.settings.align, self._history(),
                                                     system=self.settings.system))
            if longest + reserve <= self.engine.n_ctx:
                break
            if not self.turns:
                raise InputError(f"this message needs {longest} tokens; with room for a reply the context "
                                 f"holds {self.engine.n_ctx - reserve} (start with a larger --n-ctx)")
            self.turns.pop(0)
            dropped += 1
        if dropped:
            self.say(f"note: dropped the {dropped} oldest turn(s) to stay within the {self.engine.n_ctx}-token context")
        self.info.dropped = dropped

    def reply(self, message: str) -> Iterator[str]:
        """Stream the reply to ``message``; the turn is recorded when the stream ends or is interrupted."""
        check_text("message", message)
        self._fit_context(message)
        s = self.settings
        seed = None if s.seed is None else derive_seed(s.seed, self.turns_started)
        self.turns_started += 1
        options = dict(max_tokens=s.max_tokens, seed=seed, system=s.system, history=self._history())
        if s.align is None:
            stream = self.engine.stream(message, None, **options)
        else:
            judge = self._ensure_judge() if s.strength is None else None
            stream = align_stream(self.engine, message, s.align, judge=judge, strength=s.strength,
                                              temperature_mode=s.temperature_mode, amplifier_map=s.amplifier_map,
                                              on_judge_failure=s.on_judge_failure,
                                              on_warning=lambda m: self.say(f"warning: {m}"), **options)
        pieces: List[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except KeyboardInterrupt:  # the scheduler has put the caches back as they were before the step
            self._record(Turn(message, "".join(pieces), interrupted=True))
            raise
        self._finish(message, stream.result)

    def _finish(self, message: str, result) -> None:
        stats = result.stats.to_dict()
        turn = Turn(message, result.text, stats=stats)
        self.info.stats = stats
        if hasattr(result, "amplifier"):  # an SDA turn
            turn.score, turn.amplifier = result.score, result.amplifier
            self.info.score, self.info.amplifier = result.score, result.amplifier
            self.info.scoring = result.scoring
            self.info.amplifier_source = result.amplifier_source
            if result.initial_tokens_per_second:
                self.info.plain_tokens_per_second = result.initial_tokens_per_second
        else:
            self.info.score = self.info.amplifier = self.info.amplifier_source = None
            self.info.plain_tokens_per_second = stats["tokens_per_second"]
        self._record(turn)

    def _record(self, turn: Turn) -> None:
        self.turns.append(turn)
        if self.log is None:
            return
        self._unlogged.append(dict(conversation=self.conversation_id, turn=self.turns_started,
                                   model_path=str(self.engine.model_path), model_sha256=self._model_sha256,
                                   settings=asdict(self.settings), query=turn.user, reply=turn.reply,
                                   interrupted=turn.interrupted, score=turn.score, amplifier=turn.amplifier,
                                   stats=turn.stats))
        self.flush_log()

    def flush_log(self) -> bool:
        """Write the turns not logged yet, oldest first; on failure warn, keep them, and retry next turn."""
        while self._unlogged:
            try:
                self.log.record(**self._unlogged[0])
            except LogWriteError as exc:
                n = len(self._unlogged)
                self.say(f"warning: {exc}; {n} turn(s) kept, to be written at the next turn")
                return False
            self._unlogged.pop(0)
        return True

    # -- commands -------------------------------------------------------------------------------------
    def command(self, line: str) -> str:
        """Run a slash command; returns what to print. Raises ChatExit on /bye; never anything else."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = {
            "/align": self._cmd_align, "/strength": self._cmd_strength, "/judge": self._cmd_judge,
            "/show": self._cmd_show, "/clear": self._cmd_clear, "/save": self._cmd_save, "/load": self._cmd_load,
            "/help": lambda a: HELP, "/?": lambda a: HELP, "/bye": self._cmd_bye, "/exit": self._cmd_bye,
        }.get(name.lower())
        if handler is None:
            return f"unknown command {name} (try /help)"
        try:
            return handler(arg)
        except SDAError as exc:
            return f"error: {exc}"

    def _cmd_bye(self, arg):
        raise ChatExit()

    def _cmd_align(self, arg):
        if not arg:
            return f"align: {self.settings.align or 'off'} (usage: /align PRESET|TEXT|off)"
        if arg.lower() in ("off", "none"):
            self.settings.align = None
            return "alignment off: plain chat"
        alignment = resolve_alignment(arg)
        self.settings.align = alignment.preset or alignment.instruction
        if self.settings.strength is None:
            self._ensure_judge()
        return f"aligning to {alignment.preset or repr(alignment.instruction)}"

    def _cmd_strength(self, arg):
        if not arg:
            current = "auto" if self.settings.strength is None else f"{self.settings.strength:g}"
            return f"strength: {current} (usage: /strength A|auto)"
        if arg.lower() == "auto":
            self.settings.strength = None
            if self.settings.align is not None:
                self._ensure_judge()
            return f"strength: auto (judge {self.settings.judge})"
        try:
            value = float(arg)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value < 0:
            return f"error: the strength must be a finite number >= 0 or auto, got {arg!r}"
        self.settings.strength = value
        return f"strength: {value:g}"

    def _cmd_judge(self, arg):
        if not arg:
            return f"judge: {self.settings.judge} (usage: /judge auto|self|verify|local|openai[:MODEL]|none)"
        previous = (self.settings.judge, self.settings.judge_url)
        self.settings.judge = arg
        if not arg.lower().startswith("openai"):
            self.settings.judge_url = None
        try:
            self._ensure_judge()
        except SDAError:
            self.settings.judge, self.settings.judge_url = previous
            raise
        return f"judge: {arg}"

    def _cmd_show(self, arg):
        i, s = self.info, self.settings
        lines = [f"align: {s.align or 'off'}; strength: {'auto' if s.strength is None else f'{s.strength:g}'}; "
                 f"judge: {s.judge}; turns: {len(self.turns)}"]
        if i.stats is None:
            return "\n".join(lines + ["no reply yet"])
        st = i.stats
        if i.amplifier is not None:
            score = format_score(i.score, i.scoring)
            lines.append(f"last score: {score}; a = {i.amplifier:.3f} ({i.amplifier_source})")
        if st.get("mean_temperature") is not None:
            lines.append(f"mean temperature: {st['mean_temperature']:.3f}; mean JS: {st['mean_js']:.4f}")
        lines.append(f"speed: {st['tokens_per_second']:.1f} tok/s ({st['mode']}, {st['generated_tokens']} tokens); "
                     f"prefill {st['prefill_tokens_with']} new of {st['prompt_tokens_with']} prompt tokens")
        if st["mode"] == "sda" and i.plain_tokens_per_second:
            overhead = i.plain_tokens_per_second / st["tokens_per_second"]
            lines.append(f"SDA overhead: {overhead:.2f}x the time per token of one stream "
                         f"({i.plain_tokens_per_second:.1f} tok/s plain in this session)")
        elif st["mode"] == "sda":
            lines.append("SDA overhead: no one-stream generation measured yet (/strength auto or /align off)")
        return "\n".join(lines)

    def _cmd_clear(self, arg):
        self.turns = []
        self.info = LastTurnInfo()
        return "conversation cleared"

    def _cmd_save(self, arg):
        if not arg:
            return "usage: /save FILE"
        data = {"version": TRANSCRIPT_VERSION, "model": str(self.engine.model_path),
                "settings": asdict(self.settings), "turns": [asdict(t) for t in self.turns]}
        try:  # a conversation: owner-only, like the log
            write_private_text(Path(arg).expanduser(), json.dumps(data, indent=2, ensure_ascii=False))
        except OSError as exc:
            return f"error: cannot write {arg}: {exc.strerror}"
        return f"saved {len(self.turns)} turn(s) to {arg}"

    def _cmd_load(self, arg):
        if not arg:
            return "usage: /load FILE"
        try:
            data = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
            if data.get("version") != TRANSCRIPT_VERSION:
                raise ValueError(f"unsupported transcript version {data.get('version')!r}")
            settings = ChatSettings(**data["settings"])
            turns = [Turn(**t) for t in data["turns"]]
            for t in turns:
                check_text("a saved user turn", t.user)
            if settings.align is not None:
                resolve_alignment(settings.align)
            parse_failure_policy(settings.on_judge_failure)
            if settings.amplifier_map not in AMPLIFIER_MAPS:
                raise ValueError(f"unknown amplifier map {settings.amplifier_map!r}")
        except OSError as exc:
            return f"error: cannot read {arg}: {exc.strerror}"
        except (ValueError, KeyError, TypeError, SDAError) as exc:
            return f"error: {arg} is not a sda-local transcript ({exc})"
        self.settings, self.turns, self.info = settings, turns, LastTurnInfo()
        return f"loaded {len(turns)} turn(s) from {arg}; align: {settings.align or 'off'}"

    def close(self) -> None:
        self.close_judge()
        if self.log is not None and self._unlogged and not self.flush_log():
            self.say(f"warning: {len(self._unlogged)} turn(s) of this conversation could not be logged")

