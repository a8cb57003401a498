"""The default pipeline steers (issue 11): the self judge by default and in every path, expected pairs judged in
both orders, and eval's --verify-strength judge, on the real default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from sda_local.pipeline import align
from sda_local.evaluation import EvalConfig
from sda_local.errors import InputError
from sda_local.judging import DEFAULT_JUDGE, LocalJudge, make_judge
from sda_local.judging.local import PAIR_TIE_MARGIN
from sda_local.judging.selfscore import self_amplifier
from sda_local.judging.verifier import A_MAX as VERIFY_A
from sda_local.prompts import resolve_alignment
from sda_local.rubrics import rubric_for

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NO_COMMAS = "Do not use any commas in your answer."


def truthfulqa():
    path = DATA / "truthfulqa.jsonl"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"evaluation data not found at {path}")
        pytest.skip(f"evaluation data not found at {path}")
    return path


def test_the_default_judge_verifies_what_a_program_can_check_and_is_self_elsewhere(engine):
    assert DEFAULT_JUDGE == "auto"
    for instruction in ("helpfulness", "Answer like a pirate and do not use any commas."):  # not checkable in full
        result = align(engine, "Name three fruits.", instruction, max_tokens=12, seed=1)
        assert result.judge.startswith("self:") and result.scoring == "self" and result.amplifier_source == "judge"
        # score is r rounded to 6 digits; the amplifier comes from r itself
        assert result.amplifier == pytest.approx(self_amplifier(result.score), abs=1e-4) and result.amplifier_map is None
    result = align(engine, "Name three fruits.", NO_COMMAS, max_tokens=12, seed=1)
    assert result.judge == "verify" and result.scoring == "verify" and result.amplifier_source == "judge"
    assert result.amplifier == (0.0 if "," not in result.initial_text else VERIFY_A) and result.amplifier_map is None
    result = align(engine, "Name three fruits.", "helpfulness", judge="local", max_tokens=12, seed=1)
    assert result.judge.startswith("local:") and result.scoring == "expected"
    assert isinstance(result.score, float) and 1 <= result.score <= 100 and result.score_spread > 0
    assert result.amplifier_map == "sigmoid"


def test_cli_generate_uses_the_default_judge_and_reports_its_verdict(model_path):
    proc = run_cli("generate", "Name three fruits.", "--align", NO_COMMAS, "-n", "12", "--seed", "3", "--json",
                   "--threads", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["judge"] == "verify" and out["scoring"] == "verify"
    assert out["amplifier"] == (0.0 if "," not in out["initial_text"] else VERIFY_A)
    assert out["score"] == (100.0 if out["amplifier"] == 0 else 0.0)


def test_expected_pairs_are_judged_in_both_orders(engine):
    """Swapping the answers swaps the scores exactly: what the position adds cancels out."""
    judge = LocalJudge(engine, scoring="expected")
    rubric = rubric_for(resolve_alignment("helpfulness"))
    query = "How do I boil an egg?"
    a, b = "Boil it for eight minutes, then cool it in cold water.", "Eggs are food."
    forward, backward = judge.score_pair(query, a, b, rubric), judge.score_pair(query, b, a, rubric)
    assert (forward.score_a, forward.score_b) == (backward.score_b, backward.score_a)
    assert forward.tie_margin == PAIR_TIE_MARGIN > 0 and "a first" in forward.raw and "b first" in forward.raw
    greedy = LocalJudge(engine, scoring="greedy").score_pair(query, a, b, rubric)
    assert greedy.tie_margin == 0 and isinstance(greedy.score_a, int)


def test_make_judge_knows_self(engine):
    assert make_judge("self", engine).identity.startswith("self:")
    assert make_judge(None, engine, scoring="greedy").identity.startswith("auto:")  # scoring: local judges only
    assert make_judge("verify", engine).identity == "verify"
    assert make_judge("local", engine, scoring="greedy").scoring == "greedy"
    with pytest.raises(InputError, match="unknown judge"):
        make_judge("self:x", engine)
    with pytest.raises(InputError, match="judge scoring"):
        make_judge("local", engine, scoring="mode")


def test_eval_verify_strength_judge_runs_the_pipeline(tmp_path, model_path):
    run = tmp_path / "run.jsonl"
    proc = run_cli("eval", "-d", str(truthfulqa()), "--verify", "no_commas,lowercase", "--verify-limit", "2",
                   "--verify-strength", "judge", "--verify-only", "--judge", "self", "-n", "12", "--run", str(run),
                   "--temperature-mode", "paper",
                   "--threads", "1", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    records = [json.loads(line) for line in run.read_text().splitlines()[1:]]
    scores = {r["key"]: r for r in records if r["type"] == "score"}
    answers = {(r["key"], r["arm"]): r for r in records if r["type"] == "answer"}
    checks = {(r["key"], r["arm"]) for r in records if r["type"] == "check"}
    assert len(scores) == 4
    for key, score in scores.items():
        assert score["amplifier"] == pytest.approx(self_amplifier(score["score"]), abs=1e-4) and score["scoring"] == "self"
        assert answers[(key, "sda")]["stats"]["strength"] == score["amplifier"]
        assert answers[(key, "steering-only")]["stats"]["strength"] == score["amplifier"]
        assert answers[(key, "sda-fixed")]["stats"]["strength"] == 0.5
        assert {arm for k, arm in checks if k == key} == {"base", "prompt-only", "steering-only", "sda-fixed", "sda"}
    # The answer without the instruction depends on the query and seed only: both instructions share it.
    bases = {}
    for (key, arm), r in answers.items():
        if arm == "base":
            bases.setdefault(key.rsplit(":", 1)[1], set()).add(r["text"])
    assert len(bases) == 2 and all(len(texts) == 1 for texts in bases.values())
    summary = json.loads(run.with_suffix(".summary.json").read_text())
    assert summary["verifiable_amplifiers"]["no_commas"]["n"] == 2
    assert "sda-fixed" in summary["verifiable_overall"]
    assert "mean a" in proc.stdout.decode()
    # Resuming a complete run does no work.
    size = run.stat().st_size
    proc = run_cli("eval", "--resume", str(run), "--threads", "1", timeout=600)
    assert proc.returncode == 0 and run.stat().st_size == size


@pytest.mark.parametrize("args, fragment", [
    (["--judge", "self"], "--judge self sets amplifiers but cannot compare two answers"),
    (["--verify-only"], "--verify-only needs --verify"),
    (["--verify", "no_commas", "--verify-strength", "strong"], "must be a number or judge"),
])
def test_eval_refuses_what_the_self_judge_cannot_do_before_the_model_loads(tmp_path, args, fragment):
    proc = run_cli("eval", "-d", str(truthfulqa()), "--run", str(tmp_path / "r.jsonl"), "--model",
                   str(tmp_path / "absent.gguf"), *args)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_eval_config_verify_arms():
    config = EvalConfig(datasets=[{"path": "x"}], verify=["no_commas"], verify_strength="judge")
    # At the default fixed temperature steering-only would be the sda arm itself: left out.
    assert config.verify_arms == ["base", "prompt-only", "sda-fixed", "sda"]
    config.temperature_mode = "paper"
    assert config.verify_arms == ["base", "prompt-only", "steering-only", "sda-fixed", "sda"]
    config.arms = ["prompt-only", "sda"]  # arms chosen without sda-fixed
    assert config.verify_arms == ["prompt-only", "sda"]
    config.arms = ["prompt-only", "sda-fixed", "sda"]
    assert config.verify_arms == ["prompt-only", "sda-fixed", "sda"]
    assert EvalConfig(datasets=[{"path": "x"}], arms=["base", "sda"]).verify_arms == ["base", "sda"]


@pytest.mark.parametrize("history", [(), (("What is a fruit?", "A fruit is the seed-bearing part of a plant."),)],
                         ids=["alone", "conversation"])
def test_the_observed_first_answer_is_plain_generation_and_carries_r(engine, history, rows_batch_invariant):
    # The pipeline's first answer for the self judge: the same tokens as plain generation without the instruction
    # (same seed), and the r recorded while generating it equals the r of teacher-forcing it afterwards.
    from sda_local.judging.selfscore import SelfJudge

    query = "Name three fruits."
    alignment = resolve_alignment(NO_COMMAS)
    plain = engine.generate(query, None, system=alignment.system, seed=4, max_tokens=24, history=history)
    observed = engine.generate(query, NO_COMMAS, observe=True, seed=4, max_tokens=24, history=history)
    if rows_batch_invariant:  # two rows in a ubatch against one: equal where the kernels are (conftest probes it)
        assert observed.tokens == plain.tokens and observed.text == plain.text
    s = observed.stats
    assert s.mode == "observed" and s.fusion_backend is None and s.steering is None
    assert s.prompt_tokens_without < s.prompt_tokens_with
    forced = SelfJudge(engine).ratio(query, observed.text, alignment, history)
    assert engine.model.tokenize(observed.text, add_bos=False, special=False) == observed.tokens  # canonical
    assert s.observed_log_ratio == pytest.approx(forced, abs=1e-3)
    with pytest.raises(InputError):  # an observed answer needs the instruction
        engine.generate(query, None, observe=True, max_tokens=2)


def test_the_pipeline_reads_r_off_the_first_answer(engine, monkeypatch):
    # With the self judge the judging stage forces nothing (teacher forcing would fail here): r is the observed
    # first answer's, and the steered answer reuses both prompts the first answer left in the slot.
    from sda_local.judging.selfscore import SelfJudge

    def no_forcing(*args, **kwargs):
        raise AssertionError("the self judge teacher-forced the first answer again")

    monkeypatch.setattr(SelfJudge, "ratio", no_forcing)
    result = align(engine, "Name three fruits.", NO_COMMAS, judge="self", max_tokens=24, seed=4)
    monkeypatch.undo()
    alignment = resolve_alignment(NO_COMMAS)
    forced = SelfJudge(engine).ratio("Name three fruits.", result.initial_text, alignment)
    assert result.score == pytest.approx(forced, abs=1e-3) and result.amplifier_source == "judge"
    s = result.stats
    assert s.prefill_tokens_with < s.prompt_tokens_with and s.prefill_tokens_without < s.prompt_tokens_without
