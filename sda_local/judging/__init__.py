"""Judges: who scores an initial answer, and so sets SDA's amplifier (SPEC.md sections 1, 2 and 6).

* ``auto``    the default: ``verify`` where a program can check the whole instruction, else ``self``
  (``judging.verifier``).
* ``verify``  checks the prompted first answer against a verifiable instruction (``judging.checks``).
* ``local``   a GGUF model on this machine (``judging.local``): expected-value or greedy scoring.
* ``self``    no judge: the model's own likelihood ratio of the answer with and without the instruction
  (``judging.selfscore``).
* ``openai``  any OpenAI-compatible Chat Completions server (``judging.remote``).

Every judge has ``identity``, ``score(query, answer, rubric) -> Judgement``,
``score_pair(query, answer_a, answer_b, rubric) -> PairJudgement`` and ``close()``; a failure is a
``JudgeError``.
"""

from .factory import DEFAULT_JUDGE, ENGINE_JUDGES, JUDGE_OPTIONS, REMOTE_OPTIONS, make_judge, parse_judge_spec
from .local import DEFAULT_SCORING, SCORE_GRAMMAR, PAIR_GRAMMAR, SCORINGS, LocalJudge
from .remote import (API_KEY_ENVS, DEFAULT_MAX_WAIT, DEFAULT_REMOTE_MODEL, MAX_REPLY_BYTES, OPENAI_URL, RemoteJudge,
                     api_key_from_env, is_loopback_host, redact_url)
from .replies import Judgement, JudgeError, PairJudgement, format_score, parse_judge_reply, parse_scores, strict_json
from .selfscore import SelfJudge, self_amplifier
from .verifier import AutoJudge, VerifyJudge, first_answer_mode

__all__ = [
    "AutoJudge", "VerifyJudge", "first_answer_mode", "DEFAULT_JUDGE", "ENGINE_JUDGES", "API_KEY_ENVS", "DEFAULT_MAX_WAIT", "DEFAULT_REMOTE_MODEL", "DEFAULT_SCORING", "JUDGE_OPTIONS", "Judgement",
    "JudgeError", "LocalJudge", "MAX_REPLY_BYTES", "OPENAI_URL", "PAIR_GRAMMAR", "PairJudgement", "REMOTE_OPTIONS",
    "RemoteJudge", "SCORE_GRAMMAR", "format_score", "SCORINGS", "SelfJudge", "api_key_from_env", "is_loopback_host", "make_judge",
    "parse_judge_reply", "parse_judge_spec", "parse_scores", "redact_url", "self_amplifier", "strict_json",
]
