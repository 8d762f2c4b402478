"""The layout planner (`tppjax.measure.plan`, scripts/plan.py): its memory estimate against the
compiled step's `memory_analysis()`, its ranking under a memory budget, --json, bad input."""

import json

import pytest

from tests.helpers import BATCH, SEQ, TEST_MODEL
from tppjax.cli import plan as cli
from tppjax.cli import train
from tppjax.measure import plan as planner


def fake_action_s(layers, rows, split, remat):
    """Costs that grow with the work, without timing anything (the ranking is what is tested)."""
    f = 1e-4 * layers * rows * (1 + (remat != "none"))
    return {"F": f, "B": 2 * f, "W": f} if split else {"F": f, "B": 2 * f}


def by_name(cands, name):
    return next(c for c in cands if str(c) == name)


@pytest.mark.parametrize("name", ["data=2,tensor=4 remat=none",
                                  "data=2,stage=2,tensor=2:1f1b m=2 v=1 remat=none"])
def test_memory_estimate_is_within_15_percent_of_the_compiled_program(name):
    cands, _ = planner.candidates(TEST_MODEL, 8, BATCH, SEQ)
    c = by_name(cands, name)
    estimate = planner.memory(TEST_MODEL, c, BATCH, SEQ).total
    measured = planner.compiled_peak(TEST_MODEL, c, BATCH, SEQ)
    assert abs(estimate / measured - 1) <= 0.15, (name, estimate, measured)


def test_candidates_are_refused_by_the_runs_own_checks():
    cands, refused = planner.candidates(TEST_MODEL, 8, BATCH, SEQ)
    reasons = dict(refused)
    # 8 kv heads split 8 ways is fine; a batch of 8 over 8 data shards leaves one row: no m=2.
    assert "data=8:1f1b m=2 v=1 remat=none" not in map(str, cands)
    assert "dualpipe-v needs at least twice as many microbatches" in reasons[
        "stage=4,tensor=2:dualpipe-v m=4 v=2 remat=none"]
    assert all(c.sizes["stage"] * c.virtual_stages == len(c.stage_layers) for c in cands
               if c.schedule != "-")


def test_ranking_refuses_what_does_not_fit_and_json_round_trips(tmp_path, monkeypatch):
    cands, _ = planner.candidates(TEST_MODEL, 2, BATCH, SEQ)
    totals = sorted(planner.memory(TEST_MODEL, c, BATCH, SEQ).total for c in cands)
    budget = totals[len(totals) // 2]
    fits, over = planner.rank(TEST_MODEL, cands, BATCH, SEQ, budget, fake_action_s)
    assert fits and over and len(fits) + len(over) == len(cands)
    assert all(r["memory"].total <= budget for r in fits)
    assert all(r["memory"].total > budget and "over the" in r["why"] for r in over)
    assert [r["step_s"] for r in fits] == sorted(r["step_s"] for r in fits)
    # The command line writes the same ranking, and it reads back as written.
    monkeypatch.setattr(planner, "timer", lambda cfg, seq: fake_action_s)
    path = tmp_path / "plan.json"
    argv = ["--devices", "2", "--preset", "tiny", "--d-model", "64", "--heads", "16",
            "--kv-heads", "8", "--d-ff", "128", "--vocab-size", "250", "--batch-size",
            str(BATCH), "--seq-len", str(SEQ), "--memory-gib", str(budget / 2**30),
            "--json", str(path)]
    assert cli.run(argv) == 0
    data = json.loads(path.read_text())
    assert [r["layout"] for r in data["ranked"]] == [r["layout"] for r in fits]
    assert [r["memory"]["total"] for r in data["ranked"]] == [r["memory"].total for r in fits]
    assert [r["layout"] for r in data["over_budget"]] == [r["layout"] for r in over]


@pytest.mark.parametrize("argv, message", [
    (["--memory-gib", "-1"], "--memory-gib must be a finite number above 0, got -1.0"),
    (["--devices", "0"], "--devices must be at least 1, got 0"),
    (["--memory-gib", "1e-9"], "no layout fits --memory-gib 1e-09"),
])
def test_bad_input_is_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(planner, "timer", lambda cfg, seq: fake_action_s)
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(cli.run(["--preset", "tiny", "--seq-len", "16", "--devices", "2",
                                  *argv]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--stage-layers", "1,1"], "--plan auto does not plan with --stage-layers; drop"),
    (["--mesh", "data=8", "--schedule", "1f1b"], "no layout of 8 devices runs this model"),
])
def test_train_plan_auto_refuses_what_it_does_not_plan(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(planner, "timer", lambda cfg, seq: fake_action_s)
    code = train.main(["--preset", "tiny", "--plan", "auto", "--steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
