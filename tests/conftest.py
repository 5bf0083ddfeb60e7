"""Shared fixtures: tiny random models built from configs, a tiny tokenizer, a small text corpus."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker would start one torch thread per core: 15 workers on 16 cores would run 240
# threads. Split the cores between the workers instead, subprocesses included.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

CORPUS = """\
A ternary weight takes one of three values: minus one, zero or plus one. Packed two bits to a weight,
a matrix of a million ternary weights fits in a quarter of a megabyte. The scale that turns the codes
back into real numbers is the mean absolute value of the original weights. Activations are rounded to
eight bits per token, using the largest absolute value of each token as its scale. Training keeps a
full precision copy of every weight and lets gradients flow through the rounding as if it were not
there. A teacher model that was never quantized shows the student which tokens it should prefer.
The river ran past the old mill, where children counted boats and wrote their names on the stones.
In the morning the market opened early, and the smell of bread drifted along the narrow streets.
Numbers such as 12, 345 and 6789 appear in text as well as words, and a tokenizer must handle both.
"""

def run_in_triton_interpreter(script: str) -> None:
    """Run ``script`` in a fresh Python with triton's CPU interpreter on (it is chosen at import), from the
    repository root; skip where this triton's interpreter cannot run under the installed numpy."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    if "only 0-dimensional arrays can be converted" in result.stderr:
        pytest.skip("this triton's interpreter does not run under this numpy")
    assert result.returncode == 0, result.stderr[-3000:]


TINY_ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "mixtral", "qwen2_moe")


def scale_blocks(shape, granularity: str, group: int) -> list[list[tuple[int, int]]]:
    """The (row, column) positions that share one scale, spelled out for slow reference quantizers."""
    out_f, in_f = shape
    if granularity == "tensor":
        return [[(r, c) for r in range(out_f) for c in range(in_f)]]
    if granularity == "channel":
        return [[(r, c) for c in range(in_f)] for r in range(out_f)]
    return [[(r, c) for c in range(g * group, (g + 1) * group)] for r in range(out_f) for g in range(in_f // group)]


def build_tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_config(arch: str, vocab_size: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                    bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":
        return AutoConfig.for_model("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, decoder_sparse_step=1, **common)
    if arch == "gemma":
        return AutoConfig.for_model("gemma", head_dim=16, **common)
    return AutoConfig.for_model(arch, **common)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(CORPUS * 6)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random-init Llama (2 layers, hidden 64) with the tiny tokenizer: a local HF folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded GGUF), loaded once per session."""
    from bitconvert.sources import load_model

    return load_model("smollm2-135m")
