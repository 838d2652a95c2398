"""Routing policies applied by the router, with every expert in-process, on a real checkpoint."""

import pytest
import torch

from router.local import attach_local_experts
from router.model import load_dense_model
from router.routing import centroids_path, load_centroids, policy_for_model


@pytest.fixture(scope="module")
def model_and_router(checkpoints):
    model = load_dense_model(checkpoints["mixtral"], "float32")
    return model, attach_local_experts(model, checkpoints["mixtral"])


def routed_tokens(model, router, ids):
    router.drain()
    with torch.no_grad(), router.tokens(ids):
        logits = model(ids).logits
    return router.drain()[0], logits


def test_hash_policy_routes_by_token_id_alone(model_and_router):
    model, router = model_and_router
    router.policy = policy_for_model(model, "hash", hash_seed=3)
    same = torch.full((1, 6), 77)
    tokens, _ = routed_tokens(model, router, same)
    assert len([pair for pair in tokens if pair.startswith("0:")]) == 2  # one token id: the same 2 experts


def test_capacity_caps_every_expert_and_model_policy_is_untouched(model_and_router):
    model, router = model_and_router
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    router.policy = policy_for_model(model, "model")
    _, reference = routed_tokens(model, router, ids)
    router.policy = policy_for_model(model, "model", capacity_factor=1.0, overflow="reroute")
    tokens, capped = routed_tokens(model, router, ids)
    assert max(tokens.values()) <= 32 * 2 // 8  # capacity_for(32 tokens, top-2, 8 experts, 1.0) per layer
    assert capped.shape == reference.shape
    router.policy = policy_for_model(model, "model")


def test_kmeans_needs_centroids(model_and_router, tmp_path):
    model, _ = model_and_router
    with pytest.raises(ValueError, match="needs centroids"):
        policy_for_model(model, "kmeans")
    with pytest.raises(FileNotFoundError, match="run `moecluster calibrate"):
        load_centroids(centroids_path(tmp_path))
