"""The compiled tensor-parallel step holds exactly Megatron's collectives (DESIGN section 2)."""

import pytest

from spmd.hlo import collectives
from tests.helpers import BATCH, SEQ, TEST_MODEL, batch, trainer


def compiled_collectives(mesh_spec, sequence_parallel=False):
    tr = trainer(TEST_MODEL, mesh_spec, sequence_parallel)
    params, opt_state = tr.init(seed=0)
    text = tr.lower_step(params, opt_state, *tr.place(batch())).compile().as_text()
    return collectives(text, tr.mesh)


@pytest.fixture(scope="module")
def tensor_only():
    return compiled_collectives("tensor=8")


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


def test_no_weight_is_ever_all_gathered():
    """Under data x tensor with SP, all-gathers are activation-sized (T), never a weight."""
    colls = compiled_collectives("data=2,tensor=4", sequence_parallel=True)
    x_shard = BATCH // 2 * SEQ * TEST_MODEL.d_model * 4  # a data shard's X
    gathers = [c for c in colls if c.op == "all-gather"]
    assert gathers and all(c.bytes == x_shard for c in gathers), gathers
