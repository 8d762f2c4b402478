"""Draw the pictures of docs/parallelism.md from the code: the mesh, the Megatron splits, one tick.

    python scripts/figures.py            # writes docs/mesh.png, docs/megatron.png,
                                         # docs/1f1b_timeline.png, docs/1f1b_tick.png
    python scripts/figures.py --out DIR

Nothing here is drawn by hand: the device grid is `spmd.mesh.make_mesh`'s, each weight's split
is read from the model's logical axes through `spmd.rules` (the parameters are built abstractly,
nothing is computed), and the timeline and the tick come from `pipeline.schedules.make_schedule`
and `pipeline.simulate.simulate(..., lockstep=True)`, the table the executor runs. The
collective each split implies is Megatron's (Shoeybi et al. 2019), as `spmd/rules.py` states
beside each rule; `scripts/explain.py` reads the same ones from the compiled program.
"""

import sys
from pathlib import Path

from tppjax.cli.flags import Parser, configure_devices  # imports no jax

MESH = "data=2,stage=2,tensor=2"
SCHEDULE, STAGES, MICROBATCHES = "1f1b", 4, 8
# Forward order of the TP modules (the parameter path each is read from), as scripts/explain.py.
MODULES = (("embedding", "embedding"), ("attention q/k/v", "blocks/attn/wqkv"),
           ("attention out-projection", "blocks/attn/wo"), ("MLP up/gate", "blocks/mlp/w_in"),
           ("MLP down-projection", "blocks/mlp/w_down"), ("LM head", "head/w"))
# Megatron: what each split leaves partial. Row-parallel and the vocab-parallel lookup sum partial
# outputs (forward all-reduce of X); column-parallel and the vocab-parallel head sum partial
# input gradients (backward all-reduce of dX).
FORWARD_SUM = {"row-parallel", "vocab-parallel rows"}
BACKWARD_SUM = {"column-parallel", "vocab-parallel columns"}
FWD_COLOR, BWD_COLOR = "#C44E52", "#8172B2"


def split_kind(logical: tuple, spec: tuple) -> str:
    """How `tensor` splits a weight: which of its logical axes it takes, on which side of the
    model width `embed` (before it: the input side, a contracting dimension)."""
    split = [name for name, mesh_axis in zip(logical, spec, strict=True) if mesh_axis == "tensor"]
    if not split:
        return "replicated"
    before = logical.index(split[0]) < logical.index("embed")
    if split[0] == "vocab":
        return "vocab-parallel rows" if before else "vocab-parallel columns"
    return "row-parallel" if before else "column-parallel"


def weight_splits(mesh) -> list[dict]:
    """Per module of MODULES: its weight's global and per-device shapes and its split, read
    from the `tiny` model's parameters (built abstractly) through the rules table."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from tppjax.models import Transformer, build_config
    from tppjax.spmd.rules import Rules

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(build_config("tiny"), nnx.Rngs(0)))
    params = {"/".join(map(str, path)): var
              for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rows = []
    for name, path in MODULES:
        var = params[path]
        logical = tuple(var.get_metadata()["out_sharding"])
        spec = Rules().param_spec(logical)
        rows.append({"module": name, "path": path, "shape": var.shape,
                     "shard": NamedSharding(mesh, spec).shard_shape(var.shape),
                     "split": split_kind(logical, tuple(spec))})
    return rows


def tick_sends(sim, tick: int) -> list[tuple]:
    """Per stage, (action, the stage its output goes to, or None) at lockstep `tick`: F hands
    its activation to the stage holding the next virtual stage, B its input gradient to the
    one holding the previous (as `pipeline.table.plan_of` wires the sends)."""
    sched = sim.schedule
    last = sched.stages * sched.virtual_stages - 1
    out = []
    for s in range(sched.stages):
        action = next((a for (st, a), t in sim.starts.items() if st == s and t == tick), None)
        to = None
        if action is not None and action.kind != "W":
            k = sched.virtual_stage(s, action.chunk)
            neighbour = k + 1 if action.kind == "F" else k - 1
            to = sched.place(neighbour)[0] if 0 <= neighbour <= last else None
        out.append((action, to))
    return out


def steady_tick(sim) -> int:
    """The first tick on which every stage runs an action and both F and B run: the steady
    state, past the warm-up (all F) and before the cool-down."""
    stages, kinds = {}, {}
    for (s, a), t in sim.starts.items():
        stages.setdefault(t, set()).add(s)
        kinds.setdefault(t, set()).add(a.kind)
    return min(t for t in stages
               if len(stages[t]) == sim.schedule.stages and {"F", "B"} <= kinds[t])


def draw_mesh(plt, mesh, path: Path) -> None:
    """The device grid: one panel per `data` index, `stage` rows by `tensor` columns."""
    grid = mesh.devices[:, 0, :, 0]  # fsdp = context = 1 here: (data, stage, tensor)
    d, p, t = grid.shape
    fig, axes = plt.subplots(1, d, figsize=(3.2 * d, 2.6))
    for i, ax in enumerate(axes):
        for s in range(p):
            for j in range(t):
                ax.add_patch(plt.Rectangle((j, s), 0.9, 0.9, facecolor="#DCE6F2",
                                           edgecolor="black"))
                ax.text(j + 0.45, s + 0.45, f"device {grid[i, s, j].id}", ha="center",
                        va="center", fontsize=9)
        ax.set_xlim(-0.1, t)
        ax.set_ylim(p, -0.1)
        ax.set_xticks([j + 0.45 for j in range(t)], [f"tensor {j}" for j in range(t)])
        ax.set_yticks([s + 0.45 for s in range(p)], [f"stage {s}" for s in range(p)])
        ax.tick_params(length=0)
        ax.set_frame_on(False)
        ax.set_title(f"data {i}", fontsize=10)

    def groups(axis: int) -> str:
        """The device groups along `axis`: the devices one of its collectives spans."""
        last = [a for a in range(3) if a != axis] + [axis]
        moved = grid.transpose(last).reshape(-1, grid.shape[axis])
        return " ".join("{" + ",".join(str(x.id) for x in g) + "}" for g in moved)

    fig.suptitle(f"mesh {MESH.replace(',', ' x ')}", fontsize=10)
    fig.text(0.5, 0.02, f"tensor groups {groups(2)}: Megatron all-reduces, every layer\n"
             f"stage pairs {groups(1)}: pipeline sends (activations down, gradients up)\n"
             f"data pairs {groups(0)}: gradient all-reduce, once a step",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_megatron(plt, rows: list[dict], path: Path) -> None:
    """The TP modules in forward order, each weight with its split line, and on each edge the
    collectives Megatron's split puts there (forward red, backward purple)."""
    n = len(rows) + 1  # the loss below the head
    fig, ax = plt.subplots(figsize=(8.0, 0.95 * n + 0.6))
    y = {i: n - 1 - i for i in range(n)}
    for i, row in enumerate(rows):
        ax.add_patch(plt.Rectangle((0, y[i] - 0.3), 1.2, 0.6, facecolor="#DCE6F2",
                                   edgecolor="black"))
        if "rows" in row["split"] or row["split"] == "row-parallel":  # input side split
            ax.plot([0, 1.2], [y[i], y[i]], color="black", linestyle="--", linewidth=1)
        elif row["split"] != "replicated":  # output side split
            ax.plot([0.6, 0.6], [y[i] - 0.3, y[i] + 0.3], color="black", linestyle="--",
                    linewidth=1)
        ax.text(1.35, y[i] + 0.12, f"{row['module']}: {row['split']}", fontsize=9,
                weight="bold", va="center")
        ax.text(1.35, y[i] - 0.14, f"{row['path']} {tuple(row['shape'])} -> "
                f"{tuple(row['shard'])} per device", fontsize=8, va="center")
    ax.add_patch(plt.Rectangle((0, y[n - 1] - 0.3), 1.2, 0.6, facecolor="#EEEEEE",
                               edgecolor="black"))
    ax.text(1.35, y[n - 1], "loss: vocab-parallel cross-entropy, logits never gathered:\n"
            "all-reduce of max, sum-exp, target logit (b_mb x s each)", fontsize=8,
            va="center", color=FWD_COLOR)
    for i in range(n - 1):
        up, down = rows[i], rows[i + 1] if i + 1 < len(rows) else None
        notes = []
        if up["split"] in FORWARD_SUM:
            notes.append(("F: all-reduce X (sum of partial outputs)", FWD_COLOR))
        if down is not None and down["split"] in BACKWARD_SUM:
            notes.append(("B: all-reduce dX (sum of partial input gradients)", BWD_COLOR))
        if not notes:
            notes.append(("no collective: stays split over tensor", "gray"))
        ax.annotate("", (0.6, y[i + 1] + 0.3), (0.6, y[i] - 0.3),
                    arrowprops={"arrowstyle": "->"})
        for j, (text, color) in enumerate(notes):
            ax.text(0.7, y[i] - 0.5 - 0.16 * (j - (len(notes) - 1) / 2), text, fontsize=7.5,
                    color=color, va="center")
    ax.set_xlim(-0.1, 6.5)
    ax.set_ylim(-0.5, n - 0.5)
    ax.axis("off")
    ax.set_title(f"tensor parallelism: embedding, one block, head (preset tiny, {MESH});\n"
                 "dashed: where tensor splits the weight; X = b_mb x s x h, once per layer and "
                 "micro-batch\n(the embedding runs outside the pipeline: once a step, on the "
                 "whole batch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_tick(plt, sim, tick: int, path: Path) -> None:
    """One lockstep tick: what each stage runs and where its output goes at the tick's end."""
    from tppjax.pipeline.draw import COLORS, label

    sched = sim.schedule
    p, last = sched.stages, sched.stages * sched.virtual_stages - 1
    fig, ax = plt.subplots(figsize=(7.0, 0.9 * p + 0.7))
    for s, (action, to) in enumerate(tick_sends(sim, tick)):
        color = COLORS[action.kind] if action is not None else "white"
        ax.add_patch(plt.Rectangle((0, s - 0.35), 1, 0.7, facecolor=color, edgecolor="black"))
        ax.text(0.5, s, label(action, sched.virtual_stages), ha="center", va="center",
                fontsize=10, color="white" if action is not None else "black")
        ax.text(-0.1, s, f"stage {s}", ha="right", va="center", fontsize=9)
        if action is None:
            continue
        k = sched.virtual_stage(s, action.chunk)
        if to is not None:
            what = "activation" if action.kind == "F" else "gradient"
            side = 1.15 if action.kind == "F" else 1.75
            ax.annotate("", (side, to), (side, s), arrowprops={
                "arrowstyle": "->", "color": COLORS[action.kind], "linewidth": 1.5,
                "connectionstyle": "arc3,rad=-0.3" if action.kind == "F" else "arc3,rad=0.3"})
            ax.text(2.2, s + (0.18 if action.kind == "F" else -0.18),
                    f"{what} of micro-batch {action.microbatch} -> stage {to}", fontsize=8,
                    va="center")
        elif action.kind == "F" and k == last:
            ax.text(2.2, s, f"+ head and loss of micro-batch {action.microbatch}; "
                    "dLoss/dy kept here for its B", fontsize=8, va="center")
        elif action.kind == "B" and k == 0:
            ax.text(2.2, s, f"dx of micro-batch {action.microbatch} kept for the "
                    "embedding's backward (after the loop)", fontsize=8, va="center")
    ax.set_xlim(-0.9, 6.8)
    ax.set_ylim(p - 0.5, -0.6)
    ax.axis("off")
    ax.set_title(f"{sched.name} p={p} m={sched.microbatches}: lockstep tick {tick} of "
                 f"{max(sim.starts.values()) + 1}; sends happen at the tick's end", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"),
                    help="folder for the PNGs (default: the checkout's docs/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        ap.error(f"--out {out} is not a folder; create it or pick another")
    configure_devices(8)  # the mesh's 8 devices, emulated on the CPU
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tppjax.pipeline.draw import save_png
    from tppjax.pipeline.schedules import make_schedule
    from tppjax.pipeline.simulate import simulate
    from tppjax.spmd.mesh import make_mesh

    mesh = make_mesh(MESH)
    draw_mesh(plt, mesh, out / "mesh.png")
    draw_megatron(plt, weight_splits(mesh), out / "megatron.png")
    sim = simulate(make_schedule(SCHEDULE, STAGES, MICROBATCHES), lockstep=True)
    save_png(sim, out / f"{SCHEDULE}_timeline.png")
    draw_tick(plt, sim, steady_tick(sim), out / f"{SCHEDULE}_tick.png")
    print(f"wrote mesh.png, megatron.png, {SCHEDULE}_timeline.png, {SCHEDULE}_tick.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
