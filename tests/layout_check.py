"""Run under torchrun (2 processes): `layout_check.py tp|pp OUT DIR...` checks what must not
depend on the layout, with TP=2 or PP=2:

- each Hugging Face model directory DIR loads with logits equal to transformers' (<= 1e-4);
- init_weights draws this rank's slices only: OUT/rank<r>.pt holds every slice with its
  global offsets and the elements drawn, for test_model.py to compare with one process
  (and what parallel.from_main gave the rank, for test_parallel.py).

A program rather than a test so that the tests can start it once with torchrun (conftest's
`layout_runs`)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state

from forgetless import hf, parallel
from forgetless.config import ModelConfig
from forgetless.kernels import philox
from forgetless.model import build_model, init_weights, sharded_tensors
from forgetless.schedule import Micro, run

# GQA with one group per TP rank, SwiGLU, qk-norm, QKV biases, untied embeddings: every kind
# of matrix
INIT_MODEL = dict(hidden=32, layers=2, head_dim=8, query_groups=2, qk_norm=True, qkv_bias=True,
                  seq_len=16, vocab=64)
INIT_SEED = 5


def check(path: str, layout: str) -> float | None:
    """Max abs logit difference on the last pipeline stage; None elsewhere."""
    parallel.init(0, tp=2 if layout == "tp" else 1, pp=2 if layout == "pp" else 1)
    model = build_model(hf.model_config(path), initialise=False).eval()
    hf.load_weights(model, path)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = run(model, [Micro(tokens, labels=False)], forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        logits = out[0]  # [s, b, v / tp]
        if layout == "tp":
            parts = [torch.empty_like(logits) for _ in range(2)]
            dist.all_gather(parts, logits.contiguous(),
                            group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        expected = reference(tokens[:, :-1]).logits.transpose(0, 1)
    return (logits - expected).abs().max().item()


def init_slices(model: torch.nn.Module) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """(name, global shape, global offsets, values) of each initialised slice (SwiGLU's fc1
    is two slices of one name)."""
    return [(f"{sh.key}{list(sh.global_offset[:sh.prepend_axis_num])}",
             sh.global_shape[sh.prepend_axis_num:], sh.global_offset[sh.prepend_axis_num:],
             sh.data.detach().clone())
            for sh in sharded_tensors(model.sharded_state_dict()) if sh.data.dim() >= 2]


def dump_init(out: Path) -> None:
    """This rank's initial slices, with the elements the generator drew for them."""
    model = build_model(ModelConfig(**INIT_MODEL), initialise=False)
    drawn = []
    draw = philox.philox

    def counting(seed, *counters):
        drawn.append(4 * torch.broadcast_shapes(*(c.shape for c in counters)).numel())
        return draw(seed, *counters)

    philox.philox = counting
    init_weights(model, ModelConfig(**INIT_MODEL), INIT_SEED)
    philox.philox = draw
    slices = init_slices(model)
    calls = []  # parallel.from_main runs its function on rank 0 only
    digest = parallel.from_main(lambda: calls.append(1) or "c0ffee" * 10)
    torch.save({"slices": slices, "drawn": sum(drawn), "largest": max(drawn),
                "digest": digest, "digest_calls": len(calls)}, out / f"rank{dist.get_rank()}.pt")


def main() -> None:
    layout, out, paths = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    failed = False
    for path in paths:
        diff = check(path, layout)
        if diff is not None:
            failed |= not diff <= 1e-4
            if dist.get_rank() == dist.get_world_size() - 1:  # one report per model
                print(f"{layout} {path}: max abs logit difference {diff:.2e}")
    dump_init(out)
    parallel.shutdown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
