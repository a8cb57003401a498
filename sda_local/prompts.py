"""Alignment presets and the two prompts of SDA (SPEC.md section 5).

The without-instruction prompt is the model's chat template over [system, user: query]; the
with-instruction prompt is identical except that the user turn is ``query + "\\n" + instruction``, so the
two prompts share every token up to the end of the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import InputError, ModelError

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


class PromptFormatter:
    """Renders [system, user] with the model's own chat template, or a plain layout for base models."""

    def __init__(self, chat_template: Optional[str], bos_token: str, eos_token: str):
        self.chat_template = chat_template
        self._jinja = None
        self.folds_system = False  # the template has no system role: the system prompt opens the first user turn
        if chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._jinja = Jinja2ChatFormatter(chat_template, eos_token=eos_token, bos_token=bos_token)
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

    def render(self, system: Optional[str], user: str, history: Sequence[Tuple[str, str]] = ()) -> str:
        """The prompt of [system, (user, assistant) * history, user] ending where the assistant answers."""
        if self._jinja is None:
            head = f"{system}\n\n" if system else ""
            turns = "".join(f"Question: {u}\nAnswer: {a}\n\n" for u, a in history)
            return f"{head}{turns}Question: {user}\nAnswer:"
        turns = [[u, a] for u, a in history] + [[user, None]]
        messages: List[dict] = []
        if system and self.folds_system:  # as llama.cpp's chat code does for templates without a system role
            turns[0][0] = f"{system}\n\n{turns[0][0]}"
        elif system:
            messages.append({"role": "system", "content": system})
        for turn_user, turn_reply in turns:
            messages.append({"role": "user", "content": turn_user})
            if turn_reply is not None:
                messages.append({"role": "assistant", "content": turn_reply})
        return self._apply(messages)

    def pair(self, query: str, alignment: Alignment, history: Sequence[Tuple[str, str]] = ()) -> Tuple[str, str]:
        """(with-instruction prompt, without-instruction prompt). In a conversation every user turn of the
        with-stream carries the instruction, so both prompts only grow from turn to turn (cache reuse)."""
        with_instruction = [(f"{u}\n{alignment.instruction}", a) for u, a in history]
        return (
            self.render(alignment.system, f"{query}\n{alignment.instruction}", with_instruction),
            self.render(alignment.system, query, history),
        )
