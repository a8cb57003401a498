"""The OpenAI shapes of what a response sends: whole responses, stream chunks, usage, logprobs, and sda-local's
own per-token figures (``sda.token_stats``).

Logprobs are those of the step's distribution (engine/sampling.py, "Inspected"): for an SDA request the
fused, steered one after its temperature; for a plain one the model's at ``temperature``; with a
``response_format`` after the grammar's mask. They are read before top-p's cut, as llama-server's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

from ..engine.requests import TokenInfo
from .service import Delta, Plan

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}


@dataclass
class Collected:
    """A whole (non-streamed) response's deltas, joined."""

    content: str = ""
    reasoning: str = ""
    tokens: List[TokenInfo] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.content += delta.content
        self.reasoning += delta.reasoning
        self.tokens.extend(delta.tokens)


def usage(plan: Plan) -> dict:
    s = plan.job.stats if plan.job is not None else None
    prompt = s.prompt_tokens_with if s else 0
    completion = s.generated_tokens if s else 0
    cached = 0
    if s:  # the with-stream's reuse: the prompt the client sent (plus the instruction)
        cached = s.prompt_tokens_with - s.prefill_tokens_with
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(plan: Plan) -> str:
    return FINISH_REASONS.get(plan.job.stats.finish_reason, "stop") if plan.job is not None else "stop"


class Shaper:
    """Builds one response's JSON objects (``kind`` "chat" or "text")."""

    def __init__(self, model, model_id: str, plan: Plan, kind: str, response_id: str):
        self.model, self.model_id, self.plan, self.kind, self.id = model, model_id, plan, kind, response_id
        self.created = int(time.time())
        self.token_stats = plan.sda is not None and plan.sda.token_stats
        self.logprobs = plan.request.logprobs is not None
        self._text_offset = 0  # legacy completions' logprobs: where each token starts in the answer

    # -- tokens ---------------------------------------------------------------------------------------
    def _piece(self, token: int) -> bytes:
        return self.model.piece(token)

    def _text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": logprob, "bytes": list(self._piece(token))}

    def chat_logprobs(self, infos: List[TokenInfo]) -> Optional[dict]:
        if not self.logprobs:
            return None
        return {"content": [dict(self._entry(i.token, i.logprob),
                                 top_logprobs=[self._entry(t, lp) for t, lp in i.top]) for i in infos],
                "refusal": None}

    def text_logprobs(self, infos: List[TokenInfo]) -> Optional[dict]:
        if not self.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i in infos:
            out["tokens"].append(self._text(i.token))
            out["token_logprobs"].append(i.logprob)
            out["top_logprobs"].append({self._text(t): lp for t, lp in i.top})
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(i.text)  # what the token added to the answer: whole characters
        return out

    def sda_tokens(self, infos: List[TokenInfo]) -> List[dict]:
        """``sda.token_stats``: per answer token the text it added (whole characters: a token ending inside a
        UTF-8 character adds "" and the next one the character), the JS divergence between the two streams
        (nats), the temperature used, and the token the with-instruction stream alone ranked first."""
        return [{"text": i.text, "js": i.js, "temperature": i.temperature,
                 "prompt_top": self._text(i.prompt_top) if i.prompt_top is not None else None} for i in infos]

    def report(self) -> Optional[dict]:
        return dict(self.plan.report) if self.plan.sda is not None else None

    # -- whole responses ------------------------------------------------------------------------------
    def response(self, collected: Collected) -> dict:
        plan = self.plan
        if self.kind == "chat":
            message = {"role": "assistant", "content": collected.content}
            if collected.reasoning:
                message["reasoning_content"] = collected.reasoning
            choice = {"index": 0, "message": message, "logprobs": self.chat_logprobs(collected.tokens),
                      "finish_reason": finish_reason(plan)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": collected.content, "logprobs": self.text_logprobs(collected.tokens),
                      "finish_reason": finish_reason(plan)}
            obj = "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
               "choices": [choice], "usage": usage(plan)}
        if plan.sda is not None:
            out["sda"] = self.report()
            if self.token_stats:
                out["sda"]["tokens"] = self.sda_tokens(collected.tokens)
        return out

    # -- stream chunks --------------------------------------------------------------------------------
    def chunk(self, *, delta: Optional[dict] = None, text: str = "", finish: Optional[str] = None,
              logprobs: Optional[dict] = None, **extra) -> dict:
        if self.kind == "chat":
            choices = [{"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}]
            obj = "chat.completion.chunk"
        else:
            choices = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}

    def delta_chunk(self, delta: Delta) -> Optional[dict]:
        """The chunk of one delta; None when this kind has nothing to send for it (legacy completions have no
        reasoning field)."""
        if delta.reasoning:
            return self.chunk(delta={"reasoning_content": delta.reasoning}) if self.kind == "chat" else None
        extra = {"sda": {"tokens": self.sda_tokens(delta.tokens)}} if self.token_stats else {}
        if self.kind == "chat":
            return self.chunk(delta={"content": delta.content}, logprobs=self.chat_logprobs(delta.tokens), **extra)
        return self.chunk(text=delta.content, logprobs=self.text_logprobs(delta.tokens), **extra)

    def final_chunk(self) -> dict:
        extra = {"sda": self.report()} if self.plan.sda is not None else {}
        return self.chunk(finish=finish_reason(self.plan), **extra)

    def usage_chunk(self) -> dict:
        out = self.chunk(usage=usage(self.plan))
        out["choices"] = []
        return out
