"""scripts/figures.py: the pictures of docs/parallelism.md are drawn from the code, and say what
the code does (the splits from the rules table, the tick from the simulated schedule)."""
from tppjax.cli import figures


def test_draws_every_figure_small(tmp_path):
    assert figures.main(["--out", str(tmp_path)]) == 0
    names = {"mesh.png", "megatron.png", "1f1b_timeline.png", "1f1b_tick.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size < 150_000, p  # committed in docs/: keep them small


def test_splits_are_megatrons():
    from tppjax.spmd.mesh import make_mesh

    rows = figures.weight_splits(make_mesh(figures.MESH))
    assert [r["split"] for r in rows] == [
        "vocab-parallel rows", "column-parallel", "row-parallel", "column-parallel",
        "row-parallel", "vocab-parallel columns"]
    assert rows[0]["shard"] == (128, 32)  # tiny: 256 padded vocabulary rows over tensor=2


def test_tick_is_1f1b_steady_state():
    from tppjax.pipeline.schedules import make_schedule
    from tppjax.pipeline.simulate import simulate

    sim = simulate(make_schedule("1f1b", 4, 8), lockstep=True)
    tick = figures.steady_tick(sim)
    got = [(a.kind, a.microbatch, to) for a, to in figures.tick_sends(sim, tick)]
    # Column 7 of `scripts/schedule.py --schedule 1f1b --stages 4 --microbatches 8 --lockstep`:
    # activations go down one stage, gradients up one; stage 0's dx and stage 3's loss stay.
    assert (tick, got) == (7, [("B", 0, None), ("F", 3, 2), ("B", 1, 1), ("F", 2, None)])
