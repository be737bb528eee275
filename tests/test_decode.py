import pytest
import torch

from forgetless.config import ModelConfig
from forgetless.decode import Decoder, capture_errors
from forgetless.errors import UserError
from forgetless.model import build_model

TINY = dict(hidden=32, layers=2, head_dim=16, seq_len=24, vocab=512)


@pytest.mark.parametrize("variant", [{}, {"mlp": "gelu", "qk_norm": False},
                                     {"query_groups": 1}])
@pytest.mark.parametrize("eager", [True, False])
def test_decode_steps_give_the_full_forward_logits(megatron_world, variant, eager):
    """Both attentions: the filled slots (eager steps, the CPU's) and the whole cache under a
    mask (fixed shapes, CUDA's, run here on the CPU); grouped-query attention included."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, **variant)).eval()
    tokens = torch.randint(0, 512, (3, 24))
    with torch.no_grad():
        full = model(tokens, torch.arange(24).expand(3, 24), attention_mask=None)
        decoder = Decoder(model, 3, 24)
        decoder.eager = eager
        steps = torch.stack([decoder.step(tokens[:, t], torch.tensor([t]))
                             for t in range(24)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steps[:, 1:], steps[:, :-1])  # positions do differ


@pytest.mark.parametrize("eager", [True, False])
def test_decode_cache_is_only_read_up_to_the_position(megatron_world, eager):
    model = build_model(ModelConfig(**TINY)).eval()
    tokens = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        clean, dirty = Decoder(model, 2, 24), Decoder(model, 2, 24)
        clean.eager = dirty.eager = eager
        for keys, values in dirty.cache:  # stale entries beyond the position must not matter
            keys.normal_()
            values.normal_()
        for t in range(6):
            position = torch.tensor([t])
            torch.testing.assert_close(dirty.step(tokens[:, t], position),
                                       clean.step(tokens[:, t], position))


def test_only_capture_failures_blame_the_cuda_graph_flag():
    refused = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    with pytest.raises(UserError, match="kernels.cuda_graph=false") as raised:
        with capture_errors():
            raise refused
    assert raised.value.__cause__ is refused
    for other in (torch.cuda.OutOfMemoryError("CUDA out of memory while capturing"),
                  RuntimeError("NCCL error: unhandled cuda error"), ValueError("a bug")):
        with pytest.raises(type(other)) as raised:
            with capture_errors():
                raise other
        assert raised.value is other  # unchanged, with its traceback
