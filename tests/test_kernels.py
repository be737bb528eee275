"""Triton kernels against their PyTorch references (on CPU under TRITON_INTERPRET=1, which
conftest sets when there is no GPU): fresh random inputs, poisoned outputs, float64 checks,
and sampling statistics."""

import math

import numpy as np
import pytest
import torch

from forgetless.kernels import losses, philox, sampling, sampling_triton

SETTINGS = [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05},
            {"top_k": 12, "top_p": 0.9, "min_p": 0.02}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: str(s) or "plain")
def test_sampling_kernel_draws_the_reference_tokens(settings, dtype):
    generator = torch.Generator().manual_seed(len(str(settings)))
    logits = (torch.randn(16, 64, generator=generator) * 2).to(dtype)
    ids = torch.randint(0, 2**40, (16,), generator=generator)
    same = total = 0
    for position in (1, 77):
        ref = sampling.sample(logits, 1234, ids, position, **settings)
        out = sampling_triton.sample(logits, 1234, ids, position, block=64, **settings)
        same += (ref == out).sum().item()
        total += ref.numel()
    assert same >= 0.999 * total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_from_hidden_states_draws_the_logits_tokens(dtype):
    """Row, vocabulary and hidden sizes that no block divides."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(20, 48, generator=generator).to(dtype)
    weight = (torch.randn(300, 48, generator=generator) * 0.5).to(dtype)
    ids = torch.randint(0, 2**40, (20,), generator=generator)
    same = total = 0
    for position, temperature in ((1, 1.0), (9, 0.7), (77, 1.0)):
        ref = sampling.sample(hidden @ weight.t(), 5, ids, position, temperature=temperature)
        out = sampling_triton.sample_hidden(hidden, weight, 5, ids, position, temperature,
                                            block_b=16, block_v=64, block_h=32)
        same += (ref == out).sum().item()
        total += ref.numel()
    assert same >= 0.999 * total
    greedy = sampling_triton.sample_hidden(hidden, weight, 5, ids, 3, temperature=0)
    assert torch.equal(greedy, (hidden @ weight.t()).float().argmax(-1))


def test_sampling_from_hidden_states_statistics():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 16, generator=generator)
    weight = torch.randn(24, 16, generator=generator) * 0.4
    probs = torch.softmax(hidden @ weight.t(), -1)[0].double().numpy()
    draws = 800
    tokens = sampling_triton.sample_hidden(hidden.expand(draws, -1), weight, 11,
                                           torch.arange(draws), 2, block_b=16, block_v=16,
                                           block_h=16)
    freq = _frequencies(tokens, 24)
    assert np.dot(freq, probs) / np.linalg.norm(freq) / np.linalg.norm(probs) > 0.99
    assert _chi_square_ok(freq * draws, probs, draws)


def _frequencies(tokens, vocab):
    return np.bincount(tokens.numpy(), minlength=vocab) / tokens.numel()


def _chi_square_ok(counts, probs, draws):
    """Pearson's test at the 1% level (Wilson-Hilferty approximation of the quantile)."""
    keep = probs > 0
    expected = probs[keep] * draws
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = keep.sum() - 1
    z = 2.326  # 99th percentile of the standard normal
    quantile = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < quantile


@pytest.mark.parametrize("settings, draws", [({}, 60000), ({"top_k": 6}, 12000),
                                             ({"top_p": 0.7}, 12000), ({"min_p": 0.1}, 12000)],
                         ids=["plain", "top_k", "top_p", "min_p"])
def test_sampling_statistics(settings, draws):
    """The reference's draws follow the filtered distribution; the kernel (under the
    interpreter: slow, so on the first rows only) draws exactly the reference's tokens."""
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)) * 1.5
    filtered = sampling.filter_logits(logits, settings.get("top_k", 0),
                                      settings.get("top_p", 1.0), settings.get("min_p", 0.0))
    probs = torch.softmax(filtered, -1)[0].double().numpy()
    ref = sampling.sample(logits.expand(draws, -1), 99, torch.arange(draws), 5, **settings)
    freq = _frequencies(ref, 16)
    assert freq[probs == 0].sum() == 0  # filtered tokens are never drawn
    assert np.dot(freq, probs) / np.linalg.norm(freq) / np.linalg.norm(probs) > 0.99
    assert _chi_square_ok(freq * draws, probs, draws)
    kernel_draws = 64
    tokens = sampling_triton.sample(logits.expand(kernel_draws, -1), 99,
                                    torch.arange(kernel_draws), 5, block=16, **settings)
    assert torch.equal(tokens, ref[:kernel_draws])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_kl_ce_against_float64(dtype, tol):
    generator = torch.Generator().manual_seed(7)
    student = (torch.randn(2, 5, 300, generator=generator) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(2, 5, 300, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, 300, (2, 5), generator=generator)
    kl, ce = losses.kl_ce(student, teacher, labels, block=128)
    weights = torch.rand(2, 2, 5, generator=generator)
    (kl * weights[0] + ce * weights[1]).sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref_kl, ref_ce = losses.reference(s64, teacher.double(), labels)
    (ref_kl * weights[0] + ref_ce * weights[1]).sum().backward()
    scale = max(ref_kl.abs().max().item(), 1.0)
    assert (kl.double() - ref_kl).abs().max() <= tol * scale
    assert (ce.double() - ref_ce).abs().max() <= tol * max(ref_ce.abs().max().item(), 1.0)
    assert (student.grad.double() - s64.grad).abs().max() <= tol
    # equal inputs: exactly zero KL and zero KL gradient
    same = student.detach().clone().requires_grad_(True)
    zero, _ = losses.kl_ce(same, same.detach(), labels, block=128)
    zero.sum().backward()
    assert zero.abs().max() == 0 and same.grad.abs().max() == 0


def test_kernel_outputs_are_all_written(monkeypatch):
    """Outputs start poisoned (NaN): any element a kernel skipped would fail."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: poisoned(t.shape, dtype=k.get(
        "dtype", t.dtype), device=t.device))
    student = torch.randn(7, 200, requires_grad=True)
    kl, ce = losses.kl_ce(student, torch.randn(7, 200), torch.randint(0, 200, (7,)), block=64)
    (kl + ce).sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
    assert torch.isfinite(student.grad).all()
    tokens = sampling_triton.sample(torch.randn(9, 200), 1, torch.arange(9), 0, block=64)
    assert ((tokens >= 0) & (tokens < 200)).all()
    tokens = sampling_triton.sample_hidden(torch.randn(19, 40), torch.randn(200, 40), 1,
                                           torch.arange(19), 0, block_v=64, block_h=16)
    assert ((tokens >= 0) & (tokens < 200)).all()


def test_fused_linear_kl_ce_matches_and_never_holds_full_logits():
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    t_hidden, t_weight = torch.randn(40, 16, generator=generator), torch.randn(300, 16,
                                                                               generator=generator)
    labels = torch.randint(0, 300, (40,), generator=generator)
    loss, kl, ce = losses.fused_linear_kl_ce(hidden, weight, t_hidden, t_weight, labels,
                                             lam=3.0, chunk=8, block=128)
    (2 * loss).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref_kl, ref_ce = losses.reference(h64 @ w64.t(), (t_hidden @ t_weight.t()).double(), labels)
    (2 * (3.0 * ref_kl.mean() + ref_ce.mean())).backward()
    assert kl.item() == pytest.approx(ref_kl.mean().item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.mean().item(), rel=1e-5)
    assert (hidden.grad.double() - h64.grad).abs().max() < 1e-5
    assert (weight.grad.double() - w64.grad).abs().max() < 1e-5


def test_uniforms_stay_below_one():
    """With 24 bits, (2^24 - 0.5) / 2^24 rounds to 1.0 in float32: an infinite Gumbel draw."""
    from forgetless.kernels.philox import uniform

    top = uniform(torch.tensor([0, 2**32 - 1], dtype=torch.int64))
    assert top[0] > 0 and top[1] < 1
    noise = -torch.log(sampling.exponential(top))
    assert torch.isfinite(noise).all()


def test_normal_slices_are_slices_of_the_whole():
    """Any block of a keyed tensor, at any offset (4-column Philox blocks cut mid-way
    included), holds the whole tensor's numbers; other keys or seeds give others."""
    shape = (6, 5, 37)  # leading dims flattened into rows
    whole = philox.normal_slice_(torch.empty(shape), 3, "w", shape, (0, 0, 0))
    for offsets, size in (((1, 2, 5), (4, 3, 30)), ((0, 0, 33), (6, 5, 4)), ((5, 4, 0),
                                                                            (1, 1, 37))):
        part = philox.normal_slice_(torch.empty(size), 3, "w", shape, offsets)
        index = tuple(slice(o, o + n) for o, n in zip(offsets, size, strict=True))
        assert torch.equal(part, whole[index]), offsets
    transposed = torch.empty(37, 6).t()  # a non-contiguous target
    philox.normal_slice_(transposed, 3, "v", (6, 37), (0, 0))
    assert torch.equal(transposed, philox.normal_slice_(torch.empty(6, 37), 3, "v", (6, 37),
                                                        (0, 0)))
    big = philox.normal_slice_(torch.empty(256, 512), 0, "w", (256, 512), (0, 0))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    for seed, key in ((4, "w"), (3, "x")):
        other = philox.normal_slice_(torch.empty(shape), seed, key, shape, (0, 0, 0))
        assert not torch.isclose(other, whole).any(dim=-1).all()
    with pytest.raises(ValueError, match="outside"):
        philox.normal_slice_(torch.empty(2, 8), 0, "w", (4, 6), (0, 0))
