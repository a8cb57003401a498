"""Alignment presets and the two prompts of SDA (SPEC.md section 5).

The without-instruction prompt is the model's chat template over [system, user: query]; the
with-instruction prompt is identical except that the user turn is ``query + "\\n" + instruction``, so the
two prompts share every token up to the end of the query.

A rendered prompt is a ``Prompt``: the text, and which parts of it the template wrote. Only those are read
for special tokens; message text (queries, instructions, history, judged answers) is tokenized as plain text,
so ``<|im_start|>`` typed into a message stays characters and cannot open a turn (engine.tokenize_prompt).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import InputError, ModelError

log = logging.getLogger("sda_local.prompts")

QUESTION_SYSTEM = "You are an assistant. The user is asking you a question; respond to it."


@dataclass(frozen=True)
class Preset:
    name: str
    instruction: str
    system: str


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "helpfulness",
            "Be as helpful as possible: give a practical, specific and well-structured answer that directly "
            "solves the problem, with concrete steps or examples, and no vague hedging.",
            QUESTION_SYSTEM,
        ),
        Preset(
            "harmlessness",
            "Be harmless: keep the answer safe and respectful, with no toxic, biased, aggressive or dangerous "
            "content; politely decline any harmful part of the request and help only with what is safe.",
            QUESTION_SYSTEM,
        ),
        Preset(
            "honesty",
            "Be honest and truthful: state only well-supported facts, do not speculate or make up claims, and "
            "say plainly when you do not know or when something is uncertain.",
            QUESTION_SYSTEM,
        ),
        Preset(
            "empathy",
            "Respond with empathy: acknowledge and validate the person's feelings, be compassionate, "
            "supportive and non-judgemental, and offer gentle, practical guidance where it helps.",
            "You are an assistant. The user is telling you about something in their life; respond to them.",
        ),
        Preset(
            "summarization",
            "Write a faithful, concise and complete summary of the dialogue's key points, without adding "
            "anything that was not said.",
            "You are an assistant. The user gives you a dialogue; summarize it.",
        ),
    )
}


@dataclass(frozen=True)
class Alignment:
    """What to align to: a preset's instruction or a custom one (``preset`` is None then)."""

    instruction: str
    system: str
    preset: Optional[str] = None


def resolve_alignment(align: Optional[str], system: Optional[str] = None) -> Optional[Alignment]:
    """Preset name (case-insensitive) or free-text instruction -> Alignment; None/"none" -> None."""
    if align is None:
        return None
    text = align.strip()
    if not text:
        raise InputError("the alignment instruction is empty (give a preset name or an instruction text)")
    if text.lower() == "none":
        return None
    preset = PRESETS.get(text.lower())
    if preset is not None:
        return Alignment(preset.instruction, system or preset.system, preset.name)
    if len(text.split()) == 1:
        # A single word is almost always a mistyped preset, not an instruction: say so rather than steer by it.
        raise InputError(f"unknown preset {text!r} (presets: {', '.join(PRESETS)}; a custom instruction is a sentence)")
    return Alignment(text, system or QUESTION_SYSTEM, None)


def check_text(name: str, text: str) -> str:
    """Reject empty or non-UTF-8-encodable text (e.g. undecodable bytes from argv or a file)."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    if not text.strip():
        raise InputError(f"{name} is empty")
    return text


class Prompt(str):
    """A rendered prompt: the text (a str), and ``segments``, its pieces in order as (text, from_template).
    Template pieces are tokenized with special tokens parsed, message pieces as plain text. String operations
    give a plain str (no segments): such text is a raw prompt, tokenized whole with special tokens parsed, as
    llama-server does for /completion."""

    segments: Tuple[Tuple[str, bool], ...]

    def __getnewargs__(self):  # copy, deepcopy and pickle rebuild it from its segments
        return (self.segments,)

    def __new__(cls, segments: Sequence[Tuple[str, bool]]):
        merged: List[Tuple[str, bool]] = []
        for text, from_template in segments:
            if not text:
                continue
            if merged and merged[-1][1] == from_template:
                merged[-1] = (merged[-1][0] + text, from_template)
            else:
                merged.append((text, from_template))
        self = super().__new__(cls, "".join(t for t, _ in merged))
        self.segments = tuple(merged)
        return self


class PromptFormatter:
    """Renders [system, user] with the model's own chat template, or a plain layout for base models.

    The template is rendered twice: once with the messages, and once with a placeholder in place of each
    message, which shows where the template's own text lies (in any order, a message repeated or left out).
    Where the messages, put into the placeholders' places, give the first rendering exactly (or do so
    stripped, for templates that trim them), that is the prompt; a template that changes message text in some
    other way gets the messages as they were given (and a warning); one that cuts placeholders up is refused."""

    def __init__(self, chat_template: Optional[str], bos_token: str, eos_token: str):
        self.chat_template = chat_template
        self._jinja = None
        self.folds_system = False  # the template has no system role: the system prompt opens the first user turn
        if chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._jinja = Jinja2ChatFormatter(chat_template, eos_token=eos_token, bos_token=bos_token)
            # Private-use characters and digits (no case for upper/lower filters to change) with a per-formatter
            # nonce: no template writes them (and messages never reach the placeholder rendering).
            nonce = str(secrets.randbelow(10 ** 9)).zfill(9)
            self._placeholder = "\ue000" + nonce + "{}\ue001"
            self._placeholder_re = re.compile("\ue000" + nonce + r"(\d+)\ue001")
            try:
                self._jinja(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            except Exception:  # Gemma 2, Mistral-instruct, ...: raise_exception() on a system message
                self.folds_system = True
                self._apply([{"role": "user", "content": "u"}])  # a template that fails on this too is broken

    def _apply(self, messages: List[dict]) -> str:
        try:
            return self._jinja(messages=messages).prompt
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            detail = " ".join(str(exc).split())[:120]
            raise ModelError(f"the model's chat template cannot render this conversation: {detail}") from None

    @property
    def uses_chat_template(self) -> bool:
        return self._jinja is not None

    def render(self, system: Optional[str], user: str, history: Sequence[Tuple[str, str]] = ()) -> Prompt:
        """The prompt of [system, (user, assistant) * history, user] ending where the assistant answers."""
        if self._jinja is None:
            segments: List[Tuple[str, bool]] = []
            if system:
                segments += [(system, False), ("\n\n", True)]
            for u, a in history:
                segments += [("Question: ", True), (u, False), ("\nAnswer: ", True), (a, False), ("\n\n", True)]
            return Prompt(segments + [("Question: ", True), (user, False), ("\nAnswer:", True)])
        turns = [[u, a] for u, a in history] + [[user, None]]
        roles: List[Tuple[str, str]] = []
        if system and self.folds_system:  # as llama.cpp's chat code does for templates without a system role
            turns[0][0] = f"{system}\n\n{turns[0][0]}"
        elif system:
            roles.append(("system", system))
        for turn_user, turn_reply in turns:
            roles.append(("user", turn_user))
            if turn_reply is not None:
                roles.append(("assistant", turn_reply))
        rendered = self._apply([{"role": r, "content": c} for r, c in roles])
        skeleton = self._apply([{"role": r, "content": self._placeholder.format(i)} for i, (r, _) in
                                enumerate(roles)])
        # template, index, template, index, ..., template: a template may reorder, repeat or leave out messages
        pieces = self._placeholder_re.split(skeleton)
        if any("\ue000" in p or "\ue001" in p for p in pieces[0::2]):
            raise ModelError("the model's chat template cuts message text up, so sda-local cannot tell it from "
                             "the template's own (and so cannot keep control tokens typed into a message from "
                             "being read as such)")
        contents = [c for _, c in roles]
        as_given = None
        for change in (None, str.strip, str.lstrip, str.rstrip):  # templates that trim messages
            variant = contents if change is None else [change(c) for c in contents]
            prompt = Prompt([(piece, True) if i % 2 == 0 else (variant[int(piece)], False)
                             for i, piece in enumerate(pieces)])
            if prompt == rendered:
                return prompt
            as_given = as_given or prompt
        # A template that changes messages otherwise (upper-cases them, drops a part): the messages as they
        # were given, still never read for special tokens.
        log.warning("the chat template changes message text; the messages are used as given")
        return as_given

    def pair(self, query: str, alignment: Alignment, history: Sequence[Tuple[str, str]] = ()) -> Tuple[str, str]:
        """(with-instruction prompt, without-instruction prompt). In a conversation every user turn of the
        with-stream carries the instruction, so both prompts only grow from turn to turn (cache reuse)."""
        with_instruction = [(f"{u}\n{alignment.instruction}", a) for u, a in history]
        return (
            self.render(alignment.system, f"{query}\n{alignment.instruction}", with_instruction),
            self.render(alignment.system, query, history),
        )
