import pytest
import torch
from megatron.core import parallel_state

from forgetless.config import ConfigError, ModelConfig
from forgetless.model import build_model, check_layout, count_params, next_token

TINY = dict(hidden=32, layers=2, head_dim=16, seq_len=32, vocab=512)


def test_forward_shapes(megatron_world):
    model = build_model(ModelConfig(**TINY))
    tokens = torch.randint(0, 512, (3, 32))
    positions = torch.arange(31).expand(3, 31)
    logits = model(tokens[:, :-1], positions, attention_mask=None)
    assert logits.shape == (3, 31, 512)
    losses = next_token(model, tokens)
    assert losses.shape == (3, 31)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1),
                                            reduction="none").view(3, 31)
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
    # untied embeddings, no biases, RMSNorm gains and qk-norm present
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert "output_layer.weight" in names and "embedding.word_embeddings.weight" in names
    assert any("q_layernorm" in n for n in names) and any("k_layernorm" in n for n in names)
    cfg = ModelConfig(**TINY)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(cfg) - count_params(cfg, exclude_embeddings=True) == 2 * 512 * 32
    gelu = ModelConfig(**TINY, mlp="gelu", qk_norm=False)
    assert count_params(gelu) == sum(p.numel() for p in build_model(gelu).parameters())


def test_causal(megatron_world):
    model = build_model(ModelConfig(**TINY)).eval()
    tokens = torch.randint(0, 512, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 512
    a = model(tokens, positions, attention_mask=None)
    b = model(changed, positions, attention_mask=None)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gelu_variant_builds(megatron_world):
    model = build_model(ModelConfig(**TINY, mlp="gelu", qk_norm=False))
    assert next_token(model, torch.randint(0, 512, (2, 8))).shape == (2, 7)


def test_loss_falls_on_tiny_overfit(megatron_world):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = torch.randint(0, 512, (4, 32))
    first = None
    for _ in range(80):
        loss = next_token(model, batch).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert first > 6.0 and loss.item() < 0.5


@pytest.mark.parametrize("sizes, tp, pp, message", [
    (dict(hidden=96, head_dim=32), 2, 1, "model.heads: 3 does not split over parallel.tp=2"),
    (dict(vocab=511), 2, 1, "model.vocab: 511 does not split over parallel.tp=2"),
    (dict(ffn_hidden=99), 2, 1, "model.ffn_hidden: 99 does not split over parallel.tp=2"),
    (dict(layers=3), 1, 2, "model.layers: 3 does not split over parallel.pp=2"),
])
def test_sizes_the_layout_cannot_split_name_the_keys(sizes, tp, pp, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(ModelConfig(**{**TINY, **sizes}), tp, pp)


def test_layout_checked_before_megatron_builds(megatron_world, monkeypatch):
    check_layout(ModelConfig(**TINY), 2, 2)  # 2 heads, vocab 512, ffn 128, 2 layers
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="model.heads: 3 .* parallel.tp=2"):
        build_model(ModelConfig(**{**TINY, "heads": 3}))
