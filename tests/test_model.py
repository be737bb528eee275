import pytest
import torch
from megatron.core import parallel_state

from forgetless.config import ConfigError, ModelConfig
from forgetless.model import (
    build_model,
    check_layout,
    count_params,
    init_weights,
    next_token,
)

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


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_initial_weights_do_not_depend_on_the_layout(layout, layout_runs, megatron_world):
    """Each TP=2 / PP=2 rank starts from its slice of the one-process weights, and draws
    only that slice (the generator's elements add up to the rank's share, not the model)."""
    from .layout_check import INIT_MODEL, INIT_SEED, init_slices

    def place(slices):
        full = {}
        for name, shape, offsets, values in slices:
            index = tuple(slice(o, o + n) for o, n in zip(offsets, values.shape, strict=True))
            full.setdefault(name, torch.full(shape, torch.nan))[index] = values
        return full

    cfg = ModelConfig(**INIT_MODEL)
    model = build_model(cfg, initialise=False)  # megatron draws nothing
    init_weights(model, cfg, INIT_SEED)
    assert not model.decoder.layers[0].self_attention.linear_qkv.bias.any()
    reference = place(init_slices(model))
    total = sum(t.numel() for t in reference.values())
    _, out = layout_runs[layout]
    for rank in (0, 1):
        dump = torch.load(out / f"rank{rank}.pt")
        for name, part in place(dump["slices"]).items():
            drawn = ~part.isnan()
            assert drawn.any() and torch.equal(part[drawn], reference[name][drawn]), name
        local = sum(values.numel() for *_, values in dump["slices"])
        assert local < 0.75 * total and dump["drawn"] <= 1.25 * local, (layout, rank)

