"""Context parallelism (ring attention over `context`) equals one device: loss and gradients."""

import dataclasses

import pytest

from tests.helpers import TEST_MODEL, assert_matches_reference, loss_and_grads

GPT2 = dataclasses.replace(TEST_MODEL, style="gpt2", tie_embeddings=True)


@pytest.mark.parametrize(("mesh", "cfg", "kw"), [
    ("data=4,context=2", TEST_MODEL, {}),
    ("data=2,context=4", GPT2, {}),
    ("context=2,tensor=2,stage=2", TEST_MODEL, {"schedule": "1f1b", "microbatches": 2}),
], ids=["cp2-llama", "cp4-gpt2", "cp2xtp2xpp2-1f1b"])
def test_loss_and_every_gradient_match_single_device(mesh, cfg, kw):
    loss, grads = loss_and_grads(cfg, mesh, **kw)
    assert_matches_reference(cfg, loss, grads)
