"""Every strategy compiles whole (fullgraph) and matches eager."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose

pytestmark = pytest.mark.compile

STRATEGIES = [
    pytest.param({"strategy": "vmap"}, id="vmap"),
    pytest.param({"strategy": "scan"}, id="scan"),
    pytest.param({"strategy": "chunked", "chunk_size": 3}, id="chunked3"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("options", STRATEGIES)
def test_strategy_compiles_whole_and_matches_eager(options: dict) -> None:
    params = mlp_params(torch.float32)
    reducer = fa.clipped_mean(0.5)

    def step(params: dict, batch: dict) -> fa.Accumulated:
        return fa.accumulate(
            mlp_loss, params, batch, reducer=reducer, num_microbatches=7, **options
        )

    compiled = torch.compile(step, fullgraph=True)
    for seed in (1, 2):  # a second batch reuses the graph
        batch = classification_batch(23, torch.float32, seed=seed)
        got, want = compiled(params, batch), step(params, batch)
        assert_trees_allclose(got.grads, want.grads, rtol=1e-4, atol=1e-6)
        assert_trees_allclose(got.stats, want.stats, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.loss, want.loss)
