import os
import subprocess
import sys

import torch

from forgetless import losses
from forgetless.kernels import philox, sampling


def test_kl_zero_for_equal_logits_and_matches_float64():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 97) * 3
    assert torch.equal(losses.kl(a, a.clone()), torch.zeros(3, 5))
    b = torch.randn(3, 5, 97) * 3
    p = torch.softmax(b.double(), -1)
    ref = (p * (torch.log_softmax(b.double(), -1) - torch.log_softmax(a.double(), -1))).sum(-1)
    torch.testing.assert_close(losses.kl(a, b).double(), ref, rtol=1e-5, atol=1e-6)
    assert (losses.kl(a, b) > 0).all()


def test_kl_gradient_is_analytic_and_zero_at_equality():
    torch.manual_seed(2)
    student = torch.randn(2, 4, 33, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 33, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: losses.kl(s, teacher), (student,))
    same = torch.randn(2, 4, 33, requires_grad=True)
    losses.kl(same, same.detach().clone()).sum().backward()
    assert torch.equal(same.grad, torch.zeros_like(same))


def test_ntp_matches_float64_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(6, 2, 50)  # megatron's layout [positions, rows, vocab]
    tokens = torch.randint(0, 50, (2, 7))
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, 1:].t()[..., None])
    torch.testing.assert_close(losses.ntp(logits, tokens).double(), ref.squeeze(-1),
                               rtol=1e-6, atol=1e-6)


def test_philox_matches_triton_bit_for_bit():
    """The torch Philox draws exactly the numbers triton.language.philox draws."""
    code = """
import torch, triton, triton.language as tl
from forgetless.kernels.philox import philox
@triton.jit
def k(out, seed, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a, b, c, d = tl.philox(seed, i.to(tl.uint32), (i * 7).to(tl.uint32), (i * 13 + 5).to(tl.uint32),
                           (i * 3).to(tl.uint32))
    for j, x in enumerate((a, b, c, d)):
        tl.store(out + j * BLOCK + i, x.to(tl.int64) & 0xFFFFFFFF)
out = torch.zeros(4 * 64, dtype=torch.int64)
k[(1,)](out, 123456789012345, BLOCK=64)
i = torch.arange(64)
ref = torch.cat(philox(123456789012345, i, i * 7, i * 13 + 5, i * 3))
assert torch.equal(out, ref), (out[:4], ref[:4])
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_uniforms_are_uniform_and_keyed():
    ids = torch.arange(64)
    u = philox.uniforms(7, ids, torch.full((64,), 3), 1000)
    assert u.shape == (64, 1000) and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(philox.uniforms(7, ids[10:12], torch.full((2,), 3), 1000), u[10:12])
    assert not torch.equal(philox.uniforms(8, ids, torch.full((64,), 3), 1000), u)
    assert not torch.equal(philox.uniforms(7, ids, torch.full((64,), 4), 1000), u)


def test_sampling_follows_the_distribution_and_filters():
    torch.manual_seed(0)
    logits = torch.randn(1, 20) * 1.5
    n = 20000
    draws = sampling.sample(logits.expand(n, 20), seed=3, sample_ids=torch.arange(n), position=1)
    freq = torch.bincount(draws, minlength=20).double() / n
    probs = torch.softmax(logits[0].double(), -1)
    assert (freq - probs).abs().max() < 0.015
    top = sampling.sample(logits.expand(n, 20), 3, torch.arange(n), 1, top_k=3)
    assert set(top.tolist()) <= set(torch.topk(logits[0], 3).indices.tolist())
    nucleus = sampling.filter_logits(logits, top_p=0.5)
    kept = torch.isfinite(nucleus[0])
    order = torch.argsort(probs, descending=True)
    assert kept[order[0]] and probs[kept].sum() >= 0.5 > probs[kept].sum() - probs[kept].min()
    assert torch.equal(sampling.sample(logits, 0, torch.arange(1), 1, temperature=0),
                       logits.argmax(-1))
