"""On a CUDA GPU: bitconvert's decode attention inside whole models, against transformers' sdpa.

transformers' generate() (dynamic cache, left padding), bitconvert's static-cache sampler with its CUDA
graph, and a packed export loaded with load_ternary (which switches to the decode attention on CUDA).
Prints one line per check and writes $OUT/decode_attention_check.json; exits 1 if a check fails.

    python benchmarks/device/decode_attention_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import placeholder_tokenizer, relerr, smollm2_config  # noqa: E402

from bitconvert.layers.attention import DECODE_ATTENTION, decode_attention  # noqa: E402


def first_steps(model, ids, mask, steps: int = 4) -> list[torch.Tensor]:
    """Logits of the prompt's last token and of the next ``steps`` greedy tokens, through generate()."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return [logits.float() for logits in out.logits], out.sequences


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: a dry run of the script itself


def random_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@torch.no_grad()
def main() -> int:
    results, failures = {}, 0

    def record(name, value, ok):
        nonlocal failures
        failures += not ok
        results[name] = {"value": value, "ok": ok}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}", flush=True)

    model = random_model(smollm2_config(), 3)
    ids = torch.randint(3, 49152, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding
    want, want_tokens = first_steps(model, ids, mask)
    with decode_attention(model):
        assert model.config._attn_implementation == DECODE_ATTENTION
        got, got_tokens = first_steps(model, ids, mask)
    # the first step is the prompt (sdpa both times); the next ones are decode steps
    errs = [relerr(g, w) for g, w in zip(got, want)]
    record("generate: prompt logits equal", errs[0], errs[0] == 0.0)
    record("generate: first decode step's logits relerr", errs[1], errs[1] < 2e-2)  # same inputs both times
    record("generate: same greedy tokens", bool(torch.equal(got_tokens, want_tokens)), True)

    from bitconvert.train.sampling import sample_continuations

    prompts = ids[:, :16]
    model.config._attn_implementation = "sdpa"
    ours = sample_continuations(model, prompts, new_tokens=24, greedy=True)  # decode attention inside, graph on
    with_sdpa = sample_continuations(model, prompts, new_tokens=24, greedy=True, cuda_graph=False)
    record("sampler: CUDA graph used", ours.used_cuda_graph, ours.used_cuda_graph or DEVICE == "cpu")
    agree = (ours.tokens == with_sdpa.tokens).float().mean().item()
    record("sampler: tokens equal to eager decode with the same attention", agree, agree == 1.0)

    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary, load_ternary
    from bitconvert.layers.fused import fuse_projections
    from bitconvert.quant import QuantSpec

    spec = QuantSpec(weight_scale="channel")
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_bitnet(model, spec)
        export_ternary(model, placeholder_tokenizer(), tmp, spec, dtype=torch.bfloat16)
        packed, _ = load_ternary(tmp, dtype=torch.bfloat16, device=DEVICE, verify=False)
    record("load_ternary attends with", packed.config._attn_implementation,
           packed.config._attn_implementation == (DECODE_ATTENTION if DEVICE == "cuda" else "sdpa"))
    names = fuse_projections(packed)
    record("SwiGLU MLPs fused", sum(n.endswith("+swiglu") for n in names), sum(n.endswith("+swiglu") for n in names) == 30)
    got, _ = first_steps(packed, ids, mask)
    packed.config._attn_implementation = "sdpa"
    want, _ = first_steps(packed, ids, mask)
    errs = [relerr(g, w) for g, w in zip(got, want)]
    record("packed generate: first decode step's logits relerr vs sdpa", errs[1], errs[1] < 2e-2)

    out = Path(os.environ.get("OUT", "."))
    (out / "decode_attention_check.json").write_text(json.dumps({"failures": failures, "checks": results}, indent=1))
    print(f"# {len(results) - failures}/{len(results)} passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
