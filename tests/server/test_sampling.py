from __future__ import annotations

import torch

from server.sampling import filter_top_k_top_p, sample, uniform_noise


def _params(batch: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 7):
    return dict(
        temperature=torch.full((batch,), temperature),
        top_k=torch.full((batch,), top_k, dtype=torch.int64),
        top_p=torch.full((batch,), top_p),
        seeds=torch.full((batch,), seed, dtype=torch.int64),
        steps=torch.zeros(batch, dtype=torch.int64),
    )


def test_noise_is_uniform_and_keyed() -> None:
    seeds = torch.tensor([1, 1, 2])
    steps = torch.tensor([0, 1, 0])
    u = uniform_noise(seeds, steps, 20000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([1]), torch.tensor([0]), 20000)
    assert torch.equal(u[0], again[0])


def test_greedy_rows_take_argmax() -> None:
    logits = torch.randn(4, 50)
    out = sample(logits, **_params(4, temperature=0.0))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, **_params(3, top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, **_params(3, top_p=1e-6)), logits.argmax(-1))


def test_filter_keeps_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_top_k_top_p(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]


def test_row_result_does_not_depend_on_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    params = _params(5)
    params["seeds"] = torch.tensor([11, 12, 13, 14, 15])
    params["steps"] = torch.tensor([0, 3, 1, 9, 2])
    together = sample(logits, **params)
    for i in range(5):
        alone = sample(logits[i : i + 1], **{k: v[i : i + 1] for k, v in params.items()})
        assert alone.item() == together[i].item()


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(4000, 3).contiguous()
    params = _params(4000)
    params["seeds"] = torch.arange(4000)
    counts = torch.bincount(sample(logits, **params), minlength=3).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    # Temperature sharpens: at 0.5 the top token's share rises to 0.36/0.46 = 0.78.
    params["temperature"] = torch.full((4000,), 0.5)
    share = (sample(logits, **params) == 0).float().mean().item()
    assert abs(share - 0.78) < 0.03
