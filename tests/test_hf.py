"""Hugging Face conversion against transformers itself: tiny seeded models of each family
load into the megatron model with the same logits and greedy tokens, export back to the same
tensors, and what no class matches is refused naming the key."""

import json

import pytest
import torch
import transformers

from forgetless import hf
from forgetless.config import ModelConfig
from forgetless.errors import UserError
from forgetless.model import build_model, check_layout, count_params
from forgetless.sampler import generate

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {  # each exercises what its family adds
    "llama_gqa_tied_rope_scaling": (transformers.LlamaConfig,
                                    dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2_bias": (transformers.Qwen2Config, {}),
    "qwen3_qk_norm": (transformers.Qwen3Config, dict(head_dim=8)),  # heads x head_dim != hidden
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=1)),
}


def hf_model(path, config_class=transformers.LlamaConfig, **overrides):
    """A seeded random model of a family saved to `path` (weights wider than init so that
    layout mistakes show in the logits)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**{**SIZES, "bos_token_id": 1, "eos_token_id": 2, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def _logits(model, tokens):
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(family, megatron_world, tmp_path):
    config_class, overrides = FAMILIES[family]
    reference = hf_model(tmp_path, config_class, **overrides)
    cfg = hf.model_config(tmp_path)
    assert count_params(cfg) == sum(p.numel() for p in reference.parameters())
    model = build_model(cfg).eval()
    hf.load_weights(model, tmp_path)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=0, atol=1e-5)
    # greedy decoding through forgetless's KV-cache decoder gives transformers' tokens
    ours = generate(model, 1, torch.arange(2), 20, seed=0, temperature=0.0)
    theirs = reference.generate(torch.ones(2, 1, dtype=torch.long), max_new_tokens=19,
                                min_new_tokens=19, do_sample=False)
    assert torch.equal(ours, theirs)
    # and back: the same tensors under the same names
    exported = hf.hf_state_dict(model, cfg)
    state = reference.state_dict()
    if reference.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert exported.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(exported[name], value), name


def test_export_config_loads_in_transformers(megatron_world, tmp_path):
    """A forgetless architecture (qk-norm, GQA, tied, padded vocab) written as config.json and
    safetensors is a Qwen3 model with the same logits; padded rows are trimmed."""
    cfg = ModelConfig(hidden=32, layers=2, head_dim=16, seq_len=32, vocab=250, query_groups=1,
                      tie_embeddings=True, vocab_multiple=64)
    assert cfg.padded_vocab == 256
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    hf.hf_config(cfg, 1, 2, "float32").save_pretrained(tmp_path)
    hf.save_weights(hf.hf_state_dict(model, cfg), tmp_path, "5GB")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.config.vocab_size == 250
    tokens = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        expected = loaded(tokens).logits
    torch.testing.assert_close(_logits(model, tokens)[..., :250], expected, rtol=0, atol=1e-5)
    assert hf.model_config(tmp_path).resolved() == {**cfg.resolved(), "vocab_multiple": 1}


def test_sharded_weights_and_index(megatron_world, tmp_path):
    cfg = ModelConfig(hidden=32, layers=2, head_dim=16, seq_len=32, vocab=256)
    model = build_model(cfg)
    files = hf.save_weights(hf.hf_state_dict(model, cfg), tmp_path, "40KB")
    assert hf.INDEX in files and len(files) > 2
    index = json.loads((tmp_path / hf.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files) - {hf.INDEX}
    hf.hf_config(cfg, 1, 2, "float32").save_pretrained(tmp_path)
    again = build_model(hf.model_config(tmp_path))
    hf.load_weights(again, tmp_path)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    (tmp_path / index["weight_map"]["model.norm.weight"]).unlink()
    with pytest.raises(UserError, match="missing"):
        hf.load_weights(again, tmp_path)


def test_rank_slices_follow_megatron_groups(tmp_path):
    """Rank 1 of TP=2 reads exactly its query groups [q of group; k; v] and its [gate; up]
    rows: half of each split tensor, never the whole."""
    reference = hf_model(tmp_path)
    cfg = hf.model_config(tmp_path)
    reader = hf.Reader(tmp_path)
    state = reference.state_dict()
    names = tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    got = hf._shard(reader, names, "qkv", cfg, rank=1, tp=2)
    q, k, v = (state[n] for n in names)  # 4 heads in 2 groups; rank 1 holds group 1
    torch.testing.assert_close(got, torch.cat([q[32:64], k[16:32], v[16:32]]))
    gate_up = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    got = hf._shard(reader, gate_up, "gate_up", cfg, rank=1, tp=2)
    torch.testing.assert_close(got, torch.cat([state[gate_up[0]][48:], state[gate_up[1]][48:]]))
    got = hf._shard(reader, ("model.layers.0.self_attn.o_proj.weight",), "row", cfg, 1, 2)
    torch.testing.assert_close(got, state["model.layers.0.self_attn.o_proj.weight"][:, 32:])


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "RoPE"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
])
def test_unsupported_configs_are_refused(change, message, tmp_path):
    hf_model(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(UserError, match=message) as error:
        hf.model_config(tmp_path)
    assert "config.json" in str(error.value)


def test_refusals_name_the_key(megatron_world):
    with pytest.raises(UserError, match="non-gated"):
        hf.hf_config(ModelConfig(mlp="gelu"), 1, 2, "float32")
    with pytest.raises(UserError, match="model.query_groups"):
        ModelConfig(hidden=64, head_dim=16, query_groups=3)
    with pytest.raises(UserError, match="model.query_groups: 1 does not split"):
        check_layout(ModelConfig(hidden=64, head_dim=16, query_groups=1), tp=2, pp=1)
    with pytest.raises(UserError, match="vocab_multiple"):
        check_layout(ModelConfig(vocab=511), tp=2, pp=1)


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_import_parity_under_tp2_and_pp2(layout, layout_runs):
    """Each rank reads its slices (TP=2: one query group each) or its stage's layers (PP=2,
    tied embeddings on both ends): the logits are transformers' for each family."""
    stdout, _ = layout_runs[layout]
    assert stdout.count("max abs logit difference") == 3
