"""The bench's predicted step: per-action times are real, and the makespan from seconds is the
simulator's, scaled back from its integer ticks without distortion."""

import pytest

from tppjax.measure.timing import predict_lockstep_s, predict_step_s, time_actions
from tppjax.models import PRESETS
from tppjax.pipeline.schedules import make_schedule


@pytest.mark.parametrize("split", [False, True])
def test_time_actions_are_positive(split):
    costs = time_actions(PRESETS["tiny"], layers=1, b_mb=2, seq=8, split=split, repeats=2)
    assert sorted(costs) == (["B", "F", "W"] if split else ["B", "F"])
    assert all(s > 0 for s in costs.values()), costs


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 3)])
def test_predicted_step_is_the_closed_form(name, p, m):
    """Equal costs F = B = c: one micro-batch's F+B per tick pair, m + p − 1 of them."""
    c = 0.0125
    got = predict_step_s(make_schedule(name, p, m), {"F": c, "B": c})
    assert got == pytest.approx((m + p - 1) * 2 * c, rel=1e-9)


def test_predicted_step_follows_unequal_costs():
    """F = 1, B = 2 (in any unit): the simulator's closed form 3(m + p − 1), times the unit;
    zb-h1 with F = B = W is 3m + p − 1 for m ≥ p."""
    unit = 3e-4
    got = predict_step_s(make_schedule("1f1b", 4, 8), {"F": unit, "B": 2 * unit})
    assert got == pytest.approx(3 * (8 + 4 - 1) * unit, rel=1e-9)
    zb = predict_step_s(make_schedule("zb-h1", 4, 8), dict.fromkeys("FBW", unit))
    assert zb == pytest.approx((3 * 8 + 4 - 1) * unit, rel=1e-9)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8)])
def test_lockstep_prediction(p, m):
    """The executor's ticks run in lockstep, each as long as its slowest action. GPipe's never
    mix F and B (all forwards, then all backwards): (m + p − 1)(F + B), the schedule's own
    makespan. 1F1B's steady state puts an F beside a B: with F < B it pays B on those ticks, so
    lockstep is slower than the schedule's makespan, and equal to it when F = B."""
    f, b = 1e-3, 2e-3
    gpipe = predict_lockstep_s("gpipe", p, m, 1, {"F": f, "B": b})
    assert gpipe == pytest.approx((m + p - 1) * (f + b), rel=1e-9)
    costs = {"F": f, "B": b}
    assert predict_lockstep_s("1f1b", p, m, 1, costs) > predict_step_s(
        make_schedule("1f1b", p, m), costs) * (1 + 1e-6)
    equal = {"F": b, "B": b}
    assert predict_lockstep_s("1f1b", p, m, 1, equal) == pytest.approx(
        predict_step_s(make_schedule("1f1b", p, m), equal), rel=1e-9)


@pytest.mark.parametrize("m", [2, 5])
def test_lockstep_prediction_of_uneven_stages(m):
    """Each action costs its own virtual stage's layers. GPipe on 2 stages of 2 and 1 layers
    (per layer F = f, B = b): the forward ticks last 2f while stage 0 works (m of them) and f on
    the last, the backward alike: (2m + 1)(f + b). A stage of padding only costs nothing: 2 and
    0 layers take 2m(f + b). Equal counts give the equal-stage prediction."""
    f, b = 1e-3, 3e-3
    per_layers = {n: {"F": n * f, "B": n * b} for n in (1, 2)}
    assert predict_lockstep_s("gpipe", 2, m, 1, per_layers, (2, 1)) == pytest.approx(
        (2 * m + 1) * (f + b), rel=1e-9)
    assert predict_lockstep_s("gpipe", 2, m, 1, per_layers, (2, 0)) == pytest.approx(
        2 * m * (f + b), rel=1e-9)
    assert predict_lockstep_s("1f1b", 2, m, 1, per_layers, (1, 1)) == pytest.approx(
        predict_lockstep_s("1f1b", 2, m, 1, per_layers[1]), rel=1e-9)
