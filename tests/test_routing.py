"""Routing attention: equals dense attention with the explicit same-cluster mask (with gradients); online
k-means updates only in training; fixed centroids make decode equal prefill."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, Routing
from longattn.methods.routing import route
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def explicit(q, k, mu, pad):
    groups = q.shape[1] // k.shape[1]
    qc, kc = route(q, mu), route(k.repeat_interleave(groups, 1), mu)
    s = q.shape[2]
    qp, kp = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    return ((qc.unsqueeze(-1) == kc.unsqueeze(-2)) | (qp == kp)) & (kp <= qp) & pad[:, None, None, :]


@pytest.mark.parametrize("n_clusters", [1, 3, 7])
def test_equals_explicit_cluster_mask_with_gradients(n_clusters):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g) for h in (4, 2, 2))
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, :5] = False
    method = Routing(n_clusters=n_clusters)
    mu = method.layer_centroids(0, 4, 16, "cpu")
    allowed = explicit(q, k, mu, pad)
    rows = allowed.any(-1, keepdim=True)
    cot = torch.randn(q.shape, generator=g)
    grads = []
    for kind in ("reference", "routing"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if kind == "reference":
            out = dense_attention(*leaves, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
        else:
            call = AttendCall(scale=0.25, layer_idx=0)
            out = method.attend(*leaves, AttentionMask.causal(40, batch_size=2, padding=pad), call)
            assert call.attended_pairs == int(allowed.sum()) // 8
        (out * rows * cot).sum().backward()
        grads.append((out, [t.grad for t in leaves]))
    torch.testing.assert_close(grads[1][0] * rows, grads[0][0] * rows, atol=1e-5, rtol=0)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    if n_clusters == 1:  # one cluster is plain causal attention
        torch.testing.assert_close(grads[1][0] * rows, dense_attention(q, k, v, AttentionMask.causal(
            40, batch_size=2, padding=pad), scale=0.25, backend="math") * rows, atol=1e-5, rtol=0)


def test_online_kmeans_updates_only_in_training():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    longattn.patch(model, "routing", n_clusters=4, decay=0.5)
    method = longattn.patch_state(model).method
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    frozen = {k: v.clone() for k, v in method.centroids.items()}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(torch.equal(frozen[k], method.centroids[k]) for k in frozen)
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert all(not torch.equal(frozen[k], method.centroids[k]) for k in frozen)
    assert all(torch.allclose(c.norm(dim=-1), torch.ones(())) for c in method.centroids.values())


def test_decode_equals_prefill_with_fixed_centroids():
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, "routing", n_clusters=3)
    assert_decode_matches_prefill(model, ids)


def test_fit_iterations_fit_centroids_on_the_prompt():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 60, 8, generator=g) for _ in range(3))
    method = Routing(n_clusters=4, fit_iterations=3)
    before = method.layer_centroids(0, 2, 8, "cpu").clone()
    method.attend(q, k, v, AttentionMask.causal(60), AttendCall(scale=0.3, layer_idx=0))
    assert not torch.equal(before, method.centroids[0])


@pytest.mark.parametrize("params, message", [({"n_clusters": 0}, "'n_clusters' must be an integer >= 1"),
                                             ({"decay": 1.0}, r"'decay' must be in \[0, 1\)"),
                                             ({"fit_iterations": -1}, "'fit_iterations' must be an integer >= 0")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        Routing(**params)


def test_density_sets_the_number_of_clusters():
    from longattn.methods import make_method

    assert make_method("routing", density=0.1).n_clusters == 10 and make_method("routing", density=1.0).n_clusters == 1
    with pytest.raises(ValueError, match="either n_clusters or density"):
        make_method("routing", n_clusters=4, density=0.1)
