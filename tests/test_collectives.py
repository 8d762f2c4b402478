"""The compiled tensor-parallel step holds exactly Megatron's collectives (docs/design.md §2),
and no parameter is ever all-gathered (a check shown to catch a deliberate weight gather)."""

import pytest

from tests.helpers import BATCH, SEQ, TEST_MODEL, compiled, weight_gathers


@pytest.fixture(scope="module")
def tensor_only():
    return compiled("tensor=8")[1]


def test_megatron_all_reduces_per_layer(tensor_only):
    x_bytes = BATCH * SEQ * TEST_MODEL.d_model * 4  # X = b·s·h float32
    layers = TEST_MODEL.n_layers

    def per_scope(scope):
        return sum(c.count for c in tensor_only
                   if c.op == "all-reduce" and c.bytes == x_bytes and f"/{scope}/" in c.name)

    # Forward: after the row-parallel attention out-projection and MLP down-projection.
    assert per_scope("attn_out") == layers
    assert per_scope("mlp_down") == layers
    # Backward (Megatron's f): before each column-parallel input, once per block.
    assert per_scope("attn_qkv") == layers
    assert per_scope("mlp_up") == layers


def test_embedding_head_and_loss_stay_vocab_parallel(tensor_only):
    x_bytes = BATCH * SEQ * TEST_MODEL.d_model * 4
    stat_bytes = BATCH * SEQ * 4  # one float per token: max, sum-exp, target logit
    big = [c for c in tensor_only if c.bytes > stat_bytes + 64]
    # Everything activation-sized is one of the 4 per layer, the embedding's forward
    # all-reduce and the head's backward all-reduce: 4L + 2 in all, each exactly X.
    assert sum(c.count for c in big) == 4 * TEST_MODEL.n_layers + 2
    assert all(c.op == "all-reduce" and c.bytes in (x_bytes, x_bytes + 4) for c in big), big
    # The (B, T, V) logits are never gathered; nothing else moves.
    assert all(c.axes == ("tensor",) for c in tensor_only)
    assert not [c for c in tensor_only if c.op in ("all-gather", "all-to-all")]


def test_a_replicated_weight_is_caught():
    """The check behind every "no weight is gathered" below can fail: replicating the MLP
    down weight (stacked [L, d_ff, h], split over d_ff) shows up as its all-gathers, forward
    and the gradient's transpose, named by the parameter they move and by no other."""
    assert weight_gathers("tensor=8") == []
    caught = weight_gathers("tensor=8", gather="blocks/mlp/w_down")
    assert caught == [("all-gather", ("tensor",), ("blocks/mlp/w_down",))] * 2, caught


def test_no_weight_is_ever_all_gathered():
    """Under data x tensor with SP, all-gathers are activation-sized (T), never a weight.
    Dims tell them apart where sizes cannot: an SP gather's [b/d, s/t, h] operand has the
    dims of one layer's attention-out shard [heads/t, head_dim, h] here, but it grows s/t
    to s, a dim that weight has no room for."""
    x_shard = BATCH // 2 * SEQ * TEST_MODEL.d_model * 4  # a data shard's X
    gathers = [c for c in compiled("data=2,tensor=4", sequence_parallel=True)[1]
                if c.op == "all-gather"]
    assert gathers and all(c.bytes == x_shard for c in gathers), gathers
    assert weight_gathers("data=2,tensor=4", sequence_parallel=True) == []


def test_vocab_parallel_loss_reduces_max_sum_exp_and_target_logit(tensor_only):
    """Megatron's vocab-parallel cross-entropy reduces exactly three per-token statistics over
    `tensor`, once each: the max (the shift that keeps exp finite), the sum of exponentials and
    the target logit. Dropping the shift removes the max's all-reduce and nothing else fails
    on ordinary logits (`test_reference.test_loss_is_stable_for_large_logits` shows the cost)."""
    stat_bytes = BATCH * SEQ * 4
    loss = [c for c in tensor_only if c.op == "all-reduce" and "jvp(loss)/" in c.name]
    reductions = sorted(c.name.rsplit("jvp(loss)/", 1)[1].rstrip(")") for c in loss)
    assert reductions == ["reduce_max", "reduce_sum", "reduce_sum"], [c.name for c in loss]
    assert all(c.count == 1 and c.axes == ("tensor",) for c in loss), loss
    # The max and the sum of exponentials alone; XLA may combine the target logit's sum with
    # the optimizer's few gradient-norm scalars, so that one holds at least B·T floats.
    assert sorted(c.bytes for c in loss)[:2] == [stat_bytes] * 2, loss
    assert all(c.bytes >= stat_bytes for c in loss), loss
