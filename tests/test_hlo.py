"""tppjax.measure.hlo reads the right collectives (op, bytes, count, axes, name) from compiled HLO.

Expected sizes are computed from the shapes in each test, never from the program text.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tppjax.measure import hlo

AXES = ("data", "fsdp", "stage", "tensor")
F32 = 4


def make_mesh(d=1, f=1, p=1, t=1) -> Mesh:
    return jax.make_mesh((d, f, p, t), AXES, axis_types=(AxisType.Auto,) * 4)


def compiled_text(f, *args) -> str:
    return f.lower(*args).compile().as_text()


def only(colls, op):
    found = [c for c in colls if c.op == op]
    assert len(found) == 1, colls
    return found[0]


def row_parallel(mesh, b=8, k=16, n=32):
    """x[b,k] @ w[k,n] with k sharded over 'tensor': Megatron's row-parallel all-reduce."""
    x_s = NamedSharding(mesh, P("data", "tensor"))
    w_s = NamedSharding(mesh, P("tensor", None))
    out_s = NamedSharding(mesh, P("data", None))
    return x_s, w_s, out_s, (jnp.ones((b, k)), jnp.ones((k, n)))


def test_row_parallel_matmul_one_all_reduce_over_tensor():
    mesh = make_mesh(d=2, t=4)
    b, k, n = 8, 16, 32
    x_s, w_s, out_s, args = row_parallel(mesh, b, k, n)
    f = jax.jit(lambda x, w: x @ w, in_shardings=(x_s, w_s), out_shardings=out_s)
    colls = hlo.collectives(compiled_text(f, *args), mesh)
    assert [c.op for c in colls] == ["all-reduce"]
    c = colls[0]
    assert c.axes == ("tensor",)
    assert c.bytes == (b // 2) * n * F32  # per device: batch split over data=2, full n
    assert c.count == 1 and c.total_bytes == c.bytes
    assert hlo.census(colls) == {"all-reduce": {"count": 1, "bytes": c.bytes}}


def test_scan_multiplies_by_trip_count_and_named_scope_is_kept():
    mesh = make_mesh(d=2, t=4)
    b, k = 8, 16
    x_s, w_s, _, _ = row_parallel(mesh)

    def step(c, w):
        with jax.named_scope("my_scope"):
            y = c @ w
        return jax.lax.with_sharding_constraint(y, x_s)

    def one(x, w):
        return jax.lax.scan(lambda c, _: (step(c, w), None), x, None, length=3)[0]

    def two(x, w):
        inner = lambda c, _: (jax.lax.scan(lambda c, _: (step(c, w), None), c, None,
                                           length=3)[0], None)
        return jax.lax.scan(inner, x, None, length=2)[0]

    args = (jnp.ones((b, k)), jnp.ones((k, k)))
    for fn, count in ((one, 3), (two, 6)):
        colls = hlo.collectives(compiled_text(jax.jit(fn, in_shardings=(x_s, w_s)), *args), mesh)
        c = only(colls, "all-reduce")
        assert (c.count, c.axes) == (count, ("tensor",))
        assert c.bytes == (b // 2) * k * F32
        assert "my_scope" in c.name
        assert hlo.census(colls)["all-reduce"] == {"count": count, "bytes": count * c.bytes}


def test_data_parallel_gradient_is_one_tuple_all_reduce_of_param_bytes():
    mesh = make_mesh(d=2, t=4)
    params = {"a": jnp.ones((16, 8)), "b": jnp.ones((8,)), "c": jnp.ones((8, 4))}

    def loss(p, x):
        return jnp.sum((jnp.tanh(x @ p["a"] + p["b"]) @ p["c"]) ** 2)

    rep = NamedSharding(mesh, P())
    f = jax.jit(jax.grad(loss), in_shardings=(rep, NamedSharding(mesh, P("data"))),
                out_shardings=rep)
    colls = hlo.collectives(compiled_text(f, params, jnp.ones((8, 16))), mesh)
    c = only(colls, "all-reduce")
    assert c.axes == ("data",)
    assert c.bytes == sum(v.size for v in params.values()) * F32


def test_all_gather_over_data():
    mesh = make_mesh(d=2, t=4)
    f = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(mesh, P("data", "tensor")),
                out_shardings=NamedSharding(mesh, P(None, "tensor")))
    c = only(hlo.collectives(compiled_text(f, jnp.ones((8, 16))), mesh), "all-gather")
    assert c.axes == ("data",)
    assert c.bytes == 8 * (16 // 4) * F32  # gathered rows, columns still split over tensor
    assert (c.operands, c.results) == (((4, 4),), ((8, 4),))

    g = jax.jit(jax.shard_map(lambda x: jax.lax.all_gather(x, "data", tiled=True), mesh=mesh,
                              in_specs=P("data"), out_specs=P(), check_vma=False))
    c = only(hlo.collectives(compiled_text(g, jnp.ones((8, 16))), mesh), "all-gather")
    assert (c.axes, c.bytes) == (("data",), 8 * 16 * F32)


def test_reduce_scatter_counts_operand_bytes():
    mesh = make_mesh(d=2, t=4)
    f = jax.jit(jax.shard_map(
        lambda x: jax.lax.psum_scatter(x, "data", scatter_dimension=0, tiled=True),
        mesh=mesh, in_specs=P(), out_specs=P("data")))
    c = only(hlo.collectives(compiled_text(f, jnp.ones((8, 16))), mesh), "reduce-scatter")
    assert c.axes == ("data",)
    assert c.bytes == 8 * 16 * F32  # input, not the 4x16 output


def test_ppermute_over_stage_in_partial_manual_shard_map():
    mesh = make_mesh(p=4, t=2)
    ring = [(i, (i + 1) % 4) for i in range(4)]
    f = jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, "stage", ring), mesh=mesh,
                              in_specs=P("stage"), out_specs=P("stage"),
                              axis_names={"stage"}))
    c = only(hlo.collectives(compiled_text(f, jnp.ones((8, 16))), mesh), "collective-permute")
    assert c.axes == ("stage",)
    assert c.bytes == (8 // 4) * 16 * F32


def test_all_to_all_over_tensor():
    mesh = make_mesh(d=2, t=4)
    f = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, "tensor", 0, 1, tiled=True),
                              mesh=mesh, in_specs=P(None, "tensor"), out_specs=P("tensor")))
    c = only(hlo.collectives(compiled_text(f, jnp.ones((8, 16))), mesh), "all-to-all")
    assert (c.axes, c.bytes) == (("tensor",), 8 * (16 // 4) * F32)


def test_groups_are_mesh_positions_not_device_ids():
    """A mesh over permuted devices prints the same groups: ids are flat mesh positions."""
    devices = np.array(jax.devices())[[3, 7, 1, 5, 0, 4, 2, 6]].reshape(2, 1, 1, 4)
    mesh = Mesh(devices, AXES, axis_types=(AxisType.Auto,) * 4)
    x_s, w_s, out_s, args = row_parallel(mesh)
    f = jax.jit(lambda x, w: x @ w, in_shardings=(x_s, w_s), out_shardings=out_s)
    assert only(hlo.collectives(compiled_text(f, *args), mesh), "all-reduce").axes == ("tensor",)


# A hand-written module: every group format, an async pair, a tuple all-reduce, a
# conditional inside a while of unknown trip count inside a while of 5 trips.
SNIPPET = """\
HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%branch (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %ar.b = f32[4,8]{1,0} all-reduce(%p), channel_id=5, replica_groups={}, use_global_device_ids=true, to_apply=%add
}

%inner (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %v = f32[4,8]{1,0} get-tuple-element(%q), index=1
  %c = f32[4,8]{1,0} conditional(%i, %v, %v), branch_computations={%branch, %branch}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %c)
}

%cond (r: (s32[], f32[4,8])) -> pred[] {
  %r = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

%outer (o: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %o = (s32[], f32[4,8]{1,0}) parameter(0)
  %o.1 = f32[4,8]{1,0} get-tuple-element(%o), index=1
  %ar.t = f32[4,8]{1,0} all-reduce(%o.1), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(f)/while/body/my_scope/dot_general" stack_frame_id=3}
  %w = (s32[], f32[4,8]{1,0}) while(%o), condition=%cond, body=%inner
  ROOT %o.2 = (s32[], f32[4,8]{1,0}) tuple(%ar.t, %ar.t)
}

ENTRY %main (a: f32[4,8], b: bf16[16]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %tup = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%a, /*index=1*/%b), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%a), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1':(1)2}, dimensions={0}, use_global_device_ids=true
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %rs = f32[1,8]{1,0} reduce-scatter(%a), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %cps = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%a), channel_id=6, source_target_pairs={{0,2},{2,0},{4,6},{6,4}}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  %init = (s32[], f32[4,8]{1,0}) tuple(%a, %a)
  %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%outer, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hand_written_snippet():
    mesh = make_mesh(d=2, t=4)  # flat id = 4 * data + tensor
    colls = hlo.collectives(SNIPPET, mesh)
    arr = 4 * 8 * F32
    assert [(c.op, c.count, c.axes, c.bytes) for c in colls] == [
        # {} = all devices; the branch runs twice per inner body (listed twice), the inner
        # while has no known trip count (counted once), the outer runs 5 times.
        ("all-reduce", 10, ("data", "tensor"), arr),
        ("all-reduce", 5, ("data",), arr),                  # [4,2]<=[2,4]T(1,0)
        ("all-reduce", 1, ("tensor",), arr + 16 * 2),       # tuple: f32 + bf16 operands
        # device_ids [[0,4,1,5],[2,6,3,7]], grouped over the major half of axis_1:
        # groups {0,1},{4,5},{2,3},{6,7} -> tensor only. Bytes from the -done shape.
        ("all-gather", 1, ("tensor",), 8 * 8 * F32),
        ("reduce-scatter", 1, ("tensor",), arr),            # operand, not result, bytes
        ("collective-permute", 1, ("tensor",), arr),        # the -done's shape
    ]
    assert [c.name for c in colls if c.name] == ["jit(f)/while/body/my_scope/dot_general"]
    # Operand dims are looked up by name (past XLA's /*index=N*/ comments); results of an
    # async pair come from the -done.
    assert [(c.operands, c.results) for c in colls[2:5]] == [
        (((4, 8), (16,)), ((4, 8), (16,))), (((4, 8),), ((8, 8),)), (((4, 8),), ((1, 8),))]
    assert hlo.census(colls)["all-reduce"] == {
        "count": 16, "bytes": 10 * arr + 5 * arr + arr + 32}


def test_iota_groups_with_transpose():
    assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x=1") == [
        [0, 4], [1, 5], [2, 6], [3, 7]]
    assert hlo.replica_groups("replica_groups=[2,4]<=[8]") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("replica_groups={}") == []
    assert hlo.replica_groups("channel_id=1") is None
    assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}") == [
        [0, 4], [1, 5], [2, 6], [3, 7]]
    # 'b':(1)2 is the major half of b: b = 4 splits as [2 (grouped), 2].
    assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b':(1)2}") == [
        [0, 2], [1, 3], [4, 6], [5, 7]]
    assert hlo.replica_groups(
        "replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}, y=2") == [
        [0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("shape,nbytes", [
    ("f32[4,8]{1,0}", 128), ("(f32[4,8]{1,0}, bf16[16]{0})", 160), ("pred[3]", 3),
    ("s8[2,2]", 4), ("f64[2]", 16), ("u32[]", 4), ("f16[<=5]", 10), ("s4[3]", 2),
    ("(f32[2], (s64[1], u8[7]))", 23), ("f8e4m3fn[4]", 4),
])
def test_shape_bytes(shape, nbytes):
    assert hlo.shape_bytes(shape) == nbytes


def test_shape_dims():
    assert hlo.shape_dims("(f32[4,8]{1,0}, (s32[], f16[<=5]))") == ((4, 8), (), (5,))
