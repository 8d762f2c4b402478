"""Context parallelism (ring attention over `context`) equals one device: loss and gradients."""

import dataclasses

import pytest

from tests.helpers import TEST_MODEL, assert_matches_reference, loss_and_grads

GPT2 = dataclasses.replace(TEST_MODEL, style="gpt2", tie_embeddings=True)


@pytest.mark.parametrize(("mesh", "cfg", "sp"), [
    ("data=4,context=2", TEST_MODEL, False),
    ("data=2,context=4", GPT2, False),
    ("data=2,context=2,tensor=2", TEST_MODEL, True),
], ids=["cp2-llama", "cp4-gpt2", "cp2xtp2-sp"])
def test_loss_and_every_gradient_match_single_device(mesh, cfg, sp):
    loss, grads = loss_and_grads(cfg, mesh, sp)
    assert_matches_reference(cfg, loss, grads)
