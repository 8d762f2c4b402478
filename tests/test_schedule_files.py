"""Schedules as files: every built-in schedule round-trips through the JSON that
`scripts/schedule.py --json` prints and trains identically from it; a hand-edited schedule
trains in parity with one device; bad files are refused in one line naming the bad action."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import TEST_MODEL, assert_matches_reference, loss_and_grads
from tppjax.pipeline.draw import to_json
from tppjax.pipeline.schedules import (
    SCHEDULES,
    ScheduleError,
    chunks_needed,
    load_schedule,
    make_schedule,
    read_schedule_file,
    schedule_from_data,
)
from tppjax.pipeline.simulate import closed_form, simulate
from tppjax.pipeline.table import plan

ROOT = Path(__file__).resolve().parents[1]
MODEL = dataclasses.replace(TEST_MODEL, n_layers=4)
# every generator, with the chunks it runs: interleaved any v (2 here), zb-v and dualpipe-v
# exactly 2
BUILT_IN = [(name, chunks_needed(name)) for name in SCHEDULES]


def write(tmp_path, data, name="schedule.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("name,v", BUILT_IN, ids=[n for n, _ in BUILT_IN])
def test_built_in_schedules_round_trip(tmp_path, name, v):
    """What the command line prints reads back as the same schedule, closed form included."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts/schedule.py"), "--schedule", name,
                          "--stages", "4", "--microbatches", "8", "--virtual-stages", str(v),
                          "--json"], capture_output=True, text=True, check=True).stdout
    loaded = read_schedule_file(write(tmp_path, json.loads(out)))
    built = make_schedule(name, 4, 8, v)
    assert loaded == built  # placement included: zb-v's file says "v"
    assert closed_form(loaded) == closed_form(built) is not None
    assert make_schedule(write(tmp_path, json.loads(out), "again.json"), 4, 8, v) == built


def swapped_zb_h1() -> dict:
    """ZB-H1 on p = 2, m = 4 with stage 1's first W moved after the F that follows it: valid
    (nothing waits for a W), not the generator's order, so no closed form."""
    data = to_json(simulate(make_schedule("zb-h1", 2, 4)))
    acts = data["actions"][1]
    i = next(n for n, a in enumerate(acts) if a["kind"] == "W" and acts[n + 1]["kind"] == "F")
    acts[i], acts[i + 1] = acts[i + 1], acts[i]
    return data


def test_a_file_trains_as_the_name_and_an_edited_schedule_matches_one_device(tmp_path):
    """The executor's only input from a schedule is its plan (tick table, buffer sizes): a file
    and the name give the same plan, so the same program. A hand-edited order (not any
    generator's) trains exactly like one device."""
    path = write(tmp_path, to_json(simulate(make_schedule("zb-h1", 2, 4))))
    by_file, by_name = plan(path, 2, 4), plan("zb-h1", 2, 4)
    tables = [jax.tree.leaves(pl.table) for pl in (by_file, by_name)]
    assert all(map(np.array_equal, *tables)) and by_file.slots == by_name.slots
    edited = swapped_zb_h1()
    assert closed_form(schedule_from_data(edited)) is None  # not the generator's order
    shape = (16, 8)
    loss, grads = loss_and_grads(MODEL, "data=2,stage=2,tensor=2", shape=shape, microbatches=4,
                                 schedule=write(tmp_path, edited, "edited.json"))
    assert_matches_reference(MODEL, loss, grads, shape=shape)


def edit(change):
    data = to_json(simulate(make_schedule("1f1b", 2, 4)))
    change(data)
    return data


BAD = {  # what is wrong → (edit, words the one-line error must contain)
    "missing": (lambda d: d["actions"][1].pop(3), "stage 1 never runs"),
    "twice": (lambda d: d["actions"][0].append(dict(d["actions"][0][0])), "twice"),
    "own order": (lambda d: d["actions"][0].reverse(), "before"),
    # Stage 0 waits for B0 before its F1; stage 1 waits for that F1 before its B0.
    "deadlock": (lambda d: d.__setitem__("actions", [
        [{"kind": k, "microbatch": i} for i in range(4) for k in "FB"],
        [{"kind": k, "microbatch": i} for j in (0, 2) for k in "FB" for i in (j, j + 1)]]),
        "deadlock"),
    "bad kind": (lambda d: d["actions"][0][0].__setitem__("kind", "X"), "kind 'X'"),
    "no microbatch": (lambda d: d["actions"][0][0].pop("microbatch"), "no 'microbatch'"),
    "placement": (lambda d: d.__setitem__("placement", "zigzag"),
                  "placement 'zigzag' is not supported; use one of looped, v"),
    # the V placement holds two chunks per stage; this file has one
    "v placement": (lambda d: d.__setitem__("placement", "v"),
                    "placement 'v' holds two chunks per stage, but virtual_stages is 1"),
    # sizes below 1 failed far away ("max() arg is an empty sequence"); a string "false" read
    # as true
    "no microbatches": (lambda d: d.__setitem__("microbatches", 0),
                        "microbatches is 0; it must be 1 or more"),
    "negative stages": (lambda d: d.__setitem__("stages", -2), "stages is -2; it must be 1"),
    "no chunks": (lambda d: d.__setitem__("virtual_stages", 0), "virtual_stages is 0; it must"),
    "string stages": (lambda d: d.__setitem__("stages", "2"), "stages '2'; it must be an integer"),
    "string boolean": (lambda d: d.__setitem__("split_backward", "false"),
                       "split_backward 'false' must be true or false"),
    "numeric name": (lambda d: d.__setitem__("schedule", 7), "schedule 7 must be a string"),
}


@pytest.mark.parametrize("what", BAD)
def test_bad_files_are_refused_in_one_line(tmp_path, what):
    change, words = BAD[what]
    with pytest.raises(ScheduleError) as err:
        read_schedule_file(write(tmp_path, edit(change)))
    message = str(err.value)
    assert words in message and "\n" not in message and "schedule.json" in message, message


def test_v_placement_needs_two_chunks(tmp_path):
    """A ZB-V file edited to another v is refused in one line; edited to the looped placement
    it is another layout, where ZB-V's order deadlocks (stage 0's chunk 1 is then virtual
    stage p, which needs gradients from stage 1, no longer the loss)."""
    data = to_json(simulate(make_schedule("zb-v", 2, 3, 2)))
    for v in (1, 3):
        with pytest.raises(ScheduleError) as err:
            read_schedule_file(write(tmp_path, {**data, "virtual_stages": v}))
        message = str(err.value)
        assert f"placement 'v' holds two chunks per stage, but virtual_stages is {v}" in message
        assert "\n" not in message and "schedule.json" in message, message
    with pytest.raises(ScheduleError, match="deadlock"):
        schedule_from_data({**data, "placement": "looped"})
    assert closed_form(schedule_from_data(data)) is not None


def dualpipe_v_data() -> dict:
    return to_json(simulate(make_schedule("dualpipe-v", 2, 4, 2)))


def test_dualpipe_v_file_keeps_its_shared_slots(tmp_path):
    """`"joined": true` marks an action in the previous action's slot, and nothing else does;
    the file reads back as the same schedule, slots included. Without the marks the same
    order is another schedule (every action a slot of its own): valid, no closed form."""
    built = make_schedule("dualpipe-v", 2, 4, 2)
    data = dualpipe_v_data()
    for s, rows in enumerate(data["actions"]):
        assert {n for n, row in enumerate(rows) if "joined" in row} == built.joined[s] != set()
        assert all(row.get("joined", True) is True for row in rows)
    loaded = read_schedule_file(write(tmp_path, data))
    assert loaded == built and loaded.slots(0) == built.slots(0)
    assert closed_form(loaded) == closed_form(built) is not None
    for rows in data["actions"]:
        for row in rows:
            row.pop("joined", None)
    plain = schedule_from_data(data)
    assert plain.joined == () and plain.actions == built.actions
    assert closed_form(plain) is None


def test_bad_joined_is_refused_in_one_line(tmp_path):
    """joined must be true or absent, not on a stage's first action, and the slots it makes
    must follow the rules (here: a W joined by the F after it, without its B)."""
    def lone_w_then(data):  # stage 0's first W alone in its slot, then join the next action
        rows = data["actions"][0]
        n = next(n for n, row in enumerate(rows) if row["kind"] == "W" and "joined" not in row)
        rows[n + 1]["joined"] = True
        return rows[n + 1]

    cases = {
        "has joined 'yes'": lambda d: d["actions"][1][3].__setitem__("joined", "yes"),
        "has joined 1;": lambda d: d["actions"][1][3].__setitem__("joined", 1),
        "a stage's first action has no slot before it": (
            lambda d: d["actions"][0][0].__setitem__("joined", True)),
        "in a slot without its B": lone_w_then,
    }
    for words, change in cases.items():
        data = dualpipe_v_data()
        change(data)
        with pytest.raises(ScheduleError) as err:
            read_schedule_file(write(tmp_path, data))
        message = str(err.value)
        assert words in message and "\n" not in message and "schedule.json" in message, message


def test_a_file_must_fit_the_run(tmp_path):
    path = write(tmp_path, edit(lambda d: None))
    for args, flag in (((4, 4), "stage axis"), ((2, 8), "--microbatches"),
                       ((2, 4, 2), "--virtual-stages")):
        with pytest.raises(ScheduleError, match=flag):
            load_schedule(path, *args)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ScheduleError, match="not JSON"):
        read_schedule_file(str(broken))
    broken.write_bytes(b"\xff\xfe{}")  # not UTF-8 (was a UnicodeDecodeError traceback)
    with pytest.raises(ScheduleError, match="broken.json is not JSON"):
        read_schedule_file(str(broken))
