"""Bad input to the scripts other than train.py (tests/test_bad_inputs.py): one line
`error: ...` naming the value and a flag the script has, exit code 2, nothing written. Checked
in-process through each script's parse_args (milliseconds); a real process only where the
behaviour needs one."""

import pytest

from tppjax.cli import bench, explain, hf, launch_local, plot, sample, schedule


def refused(parse, argv, capsys) -> str:
    """The one line that `parse(argv)` printed on its way to exit code 2."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not out.out, out
    return lines[0].removeprefix("error: ")


SCHEDULE = ["--schedule", "1f1b", "--stages", "2", "--microbatches", "4"]


@pytest.mark.parametrize("args,expect", [
    (["--stages", "100000"], "--stages must be between 1 and 64, got 100000"),
    (["--microbatches", "100000"], "--microbatches must be between 1 and 512, got 100000"),
    (["--microbatches", "0"], "--microbatches must be between 1 and 512, got 0"),
    (["--virtual-stages", "-1"], "--virtual-stages must be between 1 and 8, got -1"),
    (["--png", "{d}/x.xyz"], "--png {d}/x.xyz: unsupported file type '.xyz'"),
    (["--png", "{d}/no/x.png"], "--png {d}/no/x.png: its folder {d}/no does not exist"),
])
def test_schedule(args, expect, tmp_path, capsys):
    """Sizes are capped (a typo of m = 100000 would simulate for minutes), and --png is
    checked before the simulation, not after it."""
    argv = SCHEDULE + [a.format(d=tmp_path) for a in args]
    assert refused(schedule.parse_args, argv, capsys).startswith(expect.format(d=tmp_path))


def test_schedule_defaults_and_file_conflicts(capsys):
    """With no flags it draws 1f1b on p=4, m=8 (it refused to run); with --schedule-file the
    file sets p, m and v, so a flag for them (ignored before) is refused."""
    args = schedule.parse_args([])
    assert (args.schedule, args.stages, args.microbatches) == ("1f1b", 4, 8)
    assert refused(schedule.parse_args, ["--schedule-file", "my.json", "--stages", "2"],
                   capsys) == ("--stages 2 conflicts with --schedule-file my.json (the file "
                               "sets it); drop --stages")


@pytest.mark.parametrize("parse,args,expect", [
    (sample.parse_args, ["--cpu-devices", "0"], "--cpu-devices must be at least 1, got 0"),
    (sample.parse_args, ["--seed", "-1"], "--seed must be between 0 and 9223372036854775807"),
    (sample.parse_args, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (hf.parse_args, ["logits", "--model", "m", "--tokens", "1", "--cpu-devices", "-2"],
     "--cpu-devices must be at least 1, got -2"),
    (hf.parse_args, ["export", "--checkpoint-dir", "c", "--out", "o", "--step", "-1"],
     "--step must be at least 0, got -1"),
], ids=["sample-devices", "sample-seed", "sample-tokens", "hf-devices", "hf-step"])
def test_sample_and_hf_limits(parse, args, expect, capsys):
    """The same range checks as train.py's (a --cpu-devices 0 became 8 devices, a negative one
    went into XLA_FLAGS)."""
    if parse is sample.parse_args:
        args = ["--checkpoint-dir", "c", "--prompt", "x", *args]
    assert refused(parse, args, capsys).startswith(expect)


@pytest.mark.parametrize("args,expect", [
    (["--processes", "2", "--port", "70000", "--", "x.py"],
     "--port must be between 1 and 65535, got 70000"),
    (["--processes", "2", "--"], "no command to run: give it after --"),
    (["--processes", "2"], "no command to run: give it after --"),  # was exit 1, no "error:"
    (["--processes", "0", "--", "x.py"], "--processes must be at least 1, got 0"),
])
def test_launch_local(args, expect, capsys):
    assert refused(launch_local.parse_args, args, capsys).startswith(expect)


@pytest.mark.parametrize("content,args,expect", [
    (b"\xff\xfe\n", [], "cannot read metrics {m}: 'utf-8' codec can't decode"),
    (b'{"loss": 1.0}\n', [], "metrics {m}: record 1 has no integer 'step'"),  # was a blank plot
    (b"[1, 2]\n", [], "metrics {m}: record 1 has no integer 'step'"),
    (b'{"step": 0, "loss": 1.0}\n', ["--out", "{d}/x.xyz"],
     "--out {d}/x.xyz: unsupported file type '.xyz'"),
])
def test_plot(content, args, expect, tmp_path, capsys):
    """Nothing is written: the image file is checked first, the metrics before plotting."""
    metrics = tmp_path / "m.jsonl"
    metrics.write_bytes(content)
    argv = [str(metrics), "--out", str(tmp_path / "loss.png")]
    argv += [a.format(d=tmp_path) for a in args]
    try:
        code = plot.main(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    assert code == 2 and out.err.splitlines() == [out.err.strip()] and not out.out, out
    assert out.err.startswith("error: " + expect.format(m=metrics, d=tmp_path)), out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


UNKNOWN = ("unknown schedule 'bogus'; use one of gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, "
           "dualpipe-v for --schedule")


@pytest.mark.parametrize("args,expect", [
    (["--schedule", "bogus"], UNKNOWN),
    (["--mesh", "stage=2,data=4", "--schedule", "bogus"], UNKNOWN),
    (["--microbatches", "4"], "--microbatches 4 needs pipeline stages, but --mesh data=4,"
     "tensor=2 has no stage axis; add stage=N to --mesh or drop --microbatches"),
    (["--virtual-stages", "2"], "--virtual-stages 2 needs pipeline stages"),
])
def test_explain_pipeline_flags(args, expect):
    """In-process, refused before anything compiles (they were ignored without a stage axis:
    it explained another layout than the one asked for)."""
    from tppjax.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        explain.explain(explain.parse_args(args))
    assert str(err.value).startswith(expect)


def test_explain_defaults_fit():
    """`explain.py` with no flags failed on its own defaults (tensor=4 on tiny's 2 kv heads)
    and named --kv-heads, which it did not have: the mesh now follows the model, and the
    model flags are its own. The Trainer checks every divisibility, compiling nothing."""
    from tppjax.cli.flags import check_run_flags, model_config
    from tppjax.spmd.mesh import make_mesh
    from tppjax.spmd.rules import Rules
    from tppjax.spmd.train_step import TrainConfig, Trainer

    args = explain.parse_args([])
    cfg = model_config(args, "tiny")
    assert check_run_flags(args, cfg, explain.SEQ_LEN) == 1 and args.mesh == "data=4,tensor=2"
    Trainer(cfg, TrainConfig(), make_mesh(args.mesh), Rules(), (args.batch_size, args.seq_len))
    assert explain.parse_args(["--kv-heads", "4"]).kv_heads == 4


@pytest.mark.parametrize("args,expect", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--layers", "-1"], "--layers must be at least 1, got -1"),
    (["--microbatches", "4", "0"], "--microbatches must be at least 1, got 0"),
    (["--generate", "-5"], "--generate must be at least 0, got -5"),
    (["--remat", "bogus"], "argument --remat: invalid choice: 'bogus'"),
    (["--layouts"], "argument --layouts: expected at least one argument"),
    (["--json", "{d}/no/bench.json"], "--json {d}/no/bench.json: its folder {d}/no does not"),
    (["--png", "{d}/bench.xyz"], "--png {d}/bench.xyz: unsupported file type '.xyz'"),
])
def test_bench_flags(args, expect, tmp_path, capsys):
    """Refused before jax is imported (--json and --png were found only after measuring)."""
    argv = [a.format(d=tmp_path) for a in args]
    assert refused(bench.parse_args, argv, capsys).startswith(expect.format(d=tmp_path))


@pytest.mark.parametrize("args,expect", [
    (["--preset", "bogus"], "unknown --preset 'bogus'; choose from tiny, small, base"),
    (["--layouts", "garbage"], "unknown mesh axis 'garbage' in --layouts 'garbage'"),
    (["--layouts", "mesh:bogus"], "--layouts 'mesh:bogus': unknown schedule 'bogus'"),
    (["--layouts", "data=8", ":1f1b"], "--layouts ':1f1b': no mesh; layouts are "
     "MESH[:SCHEDULE][+sp]"),
    (["--layouts", "data=8:1f1b"], "--layouts 'data=8:1f1b': schedule 1f1b needs stage > 1"),
    (["--layouts", "data=4"], "--layouts 'data=4': the mesh needs 4 devices, not 8"),
    # what the model or batch does not fit, found before the first layout is measured (a
    # later layout's error does not wait for the earlier ones)
    (["--seq-len", "128"], "sequence length (128) exceeds max_seq_len (64)"),
    (["--batch-size", "12", "--layouts", "data=8"], "batch size (12) is not divisible by the "
     "data x fsdp axis (8); change --batch-size or the --layouts"),  # bench has no --mesh
    (["--seq-len", "32", "--microbatches", "3", "--layouts", "data=8", "stage=2,data=4:1f1b"],
     "the batch per data shard (4 = 16 / data x fsdp) is not divisible by --microbatches 3"),
])
def test_bench_layouts(args, expect, capsys):
    """In-process through the script's own error handling: one line, exit 2, before any
    layout is built or measured (these were tracebacks, or a schedule silently ignored)."""
    assert bench.run(["--preset", "tiny", "--generate", "0", *args]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [out.err.strip()] and not out.out, out
    assert out.err.startswith("error: " + expect), out.err


def test_bench_honours_cpu_devices_over_xla_flags():
    """XLA_FLAGS already set (as in CI and here): --cpu-devices 4 still gives 4 devices (it
    was ignored: 8). A real process, since jax reads the flag once, at start."""
    import os
    import subprocess
    import sys

    from tests.test_bad_inputs import ROOT

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--cpu-devices",
                          "4", "--preset", "tiny", "--layouts", "data=8"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert out.returncode == 2 and "the mesh needs 8 devices, not 4" in out.stderr, out.stderr
