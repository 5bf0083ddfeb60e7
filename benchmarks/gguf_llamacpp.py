"""Does llama.cpp run bitconvert's GGUF export the way bitconvert runs the model? (CPU, llama-cpp-python)

Converts a model to BitNet b1.58 (or loads a finished packed export), writes it as GGUF TQ2_0 and
TQ1_0, runs both files in llama.cpp through llama_cpp, and compares llama.cpp's next-token logits
with bitconvert's on the same token ids (windows of WikiText-2 test text): top-1 agreement, the
share of bitconvert's top token inside llama.cpp's top 5, KL divergence, logit correlation, and the
perplexity each assigns. A control row does the same for the original model: transformers on the
dequantized source GGUF against llama.cpp on that file, which is the floor of disagreement between
the two runtimes when the weights are identical. Writes gguf_llamacpp.json and gguf_llamacpp.md
(gguf_llamacpp_trained.* after --train-minutes, with the training's metrics.jsonl).

    python benchmarks/gguf_llamacpp.py                         # SmolLM2-135M, post-training ternary
    python benchmarks/gguf_llamacpp.py --train-minutes 10      # short CPU distillation first
    python benchmarks/gguf_llamacpp.py --train-minutes 30 --lr 3e-3 --windows 16  # results/gguf_llamacpp_trained.*
    python benchmarks/gguf_llamacpp.py --model path/to/export  # a (GPU-trained) packed export
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.convert import convert_to_bitnet  # noqa: E402
from bitconvert.export.gguf import export_gguf, gguf_filename, source_gguf, ternary_weights  # noqa: E402
from bitconvert.export.packed import load_ternary  # noqa: E402
from bitconvert.quant import QuantSpec  # noqa: E402
from bitconvert.sources import load_model, resolve  # noqa: E402

log = logging.getLogger("gguf_llamacpp")
DATA = Path(os.environ.get("BITCONVERT_DATA", "/work/shared/data")) / "wikitext-2"


def token_windows(tokenizer, text_file: Path, seq_len: int, windows: int) -> list[list[int]]:
    text = text_file.read_text(encoding="utf-8")
    ids = tokenizer(text[: seq_len * windows * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len * windows:
        raise SystemExit(f"{text_file} gives only {len(ids)} tokens; need {seq_len * windows}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(windows)]


def torch_logits(model, windows: list[list[int]]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = [model(torch.tensor([w])).logits[0].float().numpy() for w in windows]
    return np.stack(out), time.perf_counter() - start


def llama_cpp_logits(path: Path, windows: list[list[int]], threads: int, decode_tokens: int) -> tuple[np.ndarray, dict]:
    import llama_cpp

    seq_len = len(windows[0])
    llm = llama_cpp.Llama(str(path), n_ctx=max(seq_len, decode_tokens + 1), n_batch=seq_len, logits_all=True,
                          n_threads=threads, verbose=False)
    try:
        out, seconds = [], 0.0
        for window in windows:
            llm.reset()
            start = time.perf_counter()
            llm.eval(window)
            seconds += time.perf_counter() - start
            out.append(np.array(llm.scores[:seq_len], dtype=np.float32))
        # one token at a time: the decode speed that 2-bit weights are for
        llm.reset()
        start = time.perf_counter()
        for token in windows[0][:decode_tokens]:
            llm.eval([token])
        decode = time.perf_counter() - start
        timing = {"prompt_tokens_per_s": seq_len * len(windows) / seconds,
                  "decode_tokens_per_s": decode_tokens / decode}
    finally:
        llm.close()
    return np.stack(out), timing


def block_int8(x: torch.Tensor, block: int, fp16_scale: bool) -> torch.Tensor:
    """Activations as llama.cpp quantizes them for its integer dot products: int8 per block of inputs
    (32 with an fp16 scale for Q8_0 weights, 256 with a float scale for TQ weights)."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks)).round()
    if fp16_scale:
        scale = scale.half().float()
    return (codes * scale).reshape(shape).to(x.dtype)


def float_twin(model, activations: str):
    """A plain copy of ``model`` whose linears hold the GGUF's exact ternary values (codes x fp16 step).

    ``activations``: ``float`` keeps activations in full precision; ``llama.cpp`` quantizes them per
    block as llama.cpp does (and rounds the embedding to F16 as the GGUF stores it).
    """
    twin = copy.deepcopy(model)
    weights, owners = ternary_weights(twin)
    for name, module in owners.items():
        if f"{name}.weight" not in weights:
            raise SystemExit(f"{name} is not a linear layer; the reference rows support dense models only")
        values = torch.from_numpy(weights[f"{name}.weight"].values())
        linear = torch.nn.Linear(values.shape[1], values.shape[0], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(values)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        if activations == "llama.cpp":
            block = 256 if values.shape[1] % 256 == 0 else 32
            linear.register_forward_pre_hook(lambda mod, args, b=block: (block_int8(args[0], b, b == 32),))
        twin.set_submodule(name, linear)
    if activations == "llama.cpp":
        with torch.no_grad():
            embedding = twin.get_input_embeddings().weight
            embedding.copy_(embedding.half().float())
    return twin.eval()  # float32 already; .float() is refused on a quantized (packed) model


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ours: np.ndarray, theirs: np.ndarray, windows: list[list[int]]) -> dict:
    """Agreement of two (windows, positions, vocab) logit arrays; perplexity on each window's next tokens."""
    targets = np.array([w[1:] for w in windows])
    lp_ours, lp_theirs = log_softmax(ours[:, :-1]), log_softmax(theirs[:, :-1])
    top_ours = ours.argmax(-1)
    top5_theirs = np.argsort(-theirs, axis=-1)[..., :5]
    nll = lambda lp: -np.take_along_axis(lp, targets[..., None], -1).mean()  # noqa: E731
    return {
        "positions": int(top_ours.size),
        "top1_agreement": float((top_ours == theirs.argmax(-1)).mean()),
        "top1_in_their_top5": float((top5_theirs == top_ours[..., None]).any(-1).mean()),
        "kl_ours_theirs_mean": float((np.exp(lp_ours) * (lp_ours - lp_theirs)).sum(-1).mean()),
        "logit_correlation": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "logit_std": float(ours.std()),
        "perplexity_ours": float(np.exp(nll(lp_ours))),
        "perplexity_theirs": float(np.exp(nll(lp_theirs))),
    }


def tokenization_agreement(gguf_path: Path, tokenizer, text: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=8, vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    same = sum(a == b for a, b in zip(ours, theirs))
    return {"tokens_ours": len(ours), "tokens_llama_cpp": len(theirs), "identical": ours == theirs,
            "same_prefix_positions": same}


def train_briefly(model: str, out: Path, minutes: float, spec: QuantSpec, lr: float) -> Path:
    """A short CPU distillation through bitconvert's own pipeline (also exports the GGUFs via its registry)."""
    from bitconvert.api import quantize
    from bitconvert.recipes.loading import recipe_from_dict

    recipe = recipe_from_dict({
        "model": model, "output": str(out), "device": "cpu",
        "convert": {"weight_scale": spec.weight_scale, "group_size": spec.group_size},
        "data": {"train": [{"path": str(DATA / "valid.txt")}], "sequence_length": 128},
        "train": {"mode": "distill", "minutes": minutes, "batch_size": 4, "lr": lr, "quant_warmup_steps": 20,
                  "warmup_steps": 5, "log_every": 5, "save_every": 0, "save_every_minutes": 0},
        "export": {"formats": ["packed", "gguf-tq2_0", "gguf-tq1_0"], "dtype": "float32"},
    }, [], source="benchmark")
    result = quantize(recipe)
    log.info("trained %d steps on %d tokens in %.0f s", result.train.steps, result.train.tokens, result.train.seconds)
    return out


def file_tensor_types(path: Path, qtype: str) -> tuple[dict[str, int], list[str]]:
    """Tensor types of a GGUF written elsewhere (by the recipe's exporters), and why some ternary ones are Q8_0."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    kinds = [t.tensor_type.name for t in tensors]
    # the reader gives shapes innermost first: shape[0] is the row length the TQ blocks would span
    rows = sorted({int(t.shape[0]) for t in tensors if t.tensor_type.name == "Q8_0"})
    note = (f"{qtype}: {kinds.count('Q8_0')} tensors with rows of {rows} inputs (not a multiple of 256) are Q8_0 "
            f"instead of {qtype.upper()} (lossless for ternary codes)")
    notes = [note] if rows else []
    return {t: kinds.count(t) for t in sorted(set(kinds))}, notes


def markdown(results: dict) -> str:
    lines = [
        "# GGUF export run by llama.cpp vs bitconvert",
        "",
        f"Model: {results['model']} ({results['how']}), weight scales per {results['spec']['weight_scale']}; "
        f"{results['windows']} windows of {results['seq_len']} WikiText-2 test tokens, the same token ids in both "
        f"runtimes; llama-cpp-python {results['llama_cpp_version']}, {results['threads']} CPU threads "
        f"({results['machine']}; a shared machine, load average {results['load_average_at_end'][0]:.1f} at the "
        "end, so the speed columns are indicative only).",
        "",
        "Each row compares a torch model (left) with llama.cpp running a GGUF (right) on the same tokens.",
        "",
        "| torch model vs llama.cpp file | GGUF MiB | top-1 agree | torch top-1 in llama.cpp top-5 "
        "| KL(torch‖llama.cpp) | logit corr | max abs diff | ppl torch | ppl llama.cpp | llama.cpp prompt tok/s "
        "| decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        c, t = row["comparison"], row.get("timing")
        size = f"{row['mib']:.1f}" if "mib" in row else ""
        speed = f"{t['prompt_tokens_per_s']:.0f} | {t['decode_tokens_per_s']:.1f}" if t else " | "
        lines.append(
            f"| {row['name']} | {size} | {c['top1_agreement']:.3f} | {c['top1_in_their_top5']:.3f} "
            f"| {c['kl_ours_theirs_mean']:.4f} | {c['logit_correlation']:.5f} | {c['max_abs_logit_diff']:.3f} "
            f"| {c['perplexity_ours']:.4g} | {c['perplexity_theirs']:.4g} | {speed} |")
    lines += ["", "Tensor types per file:", ""]
    for row in results["rows"]:
        if "tensor_types" in row:
            lines.append(f"- {row['name']}: {row['tensor_types']}")
    lines += ["", f"Tokenizer check (llama.cpp's tokenizer from the GGUF vs bitconvert's on the first 2,000 "
              f"characters): {json.dumps(results['tokenization'])}", ""]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model to convert, or a finished packed export folder")
    parser.add_argument("--weight-scale", default="channel", choices=["tensor", "channel", "group"])
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--train-minutes", type=float, default=0.0, help="CPU distillation before export (0 = none)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of that distillation")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--text", type=Path, default=DATA / "test.txt")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, help="where to keep the exports (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import llama_cpp

    work = args.work or Path(tempfile.mkdtemp(prefix="gguf_bench_"))
    spec = QuantSpec(weight_scale=args.weight_scale, group_size=args.group_size)
    source = resolve(args.model)
    notes = []
    rows = []
    original = None
    if source.kind == "ternary":
        model, tokenizer = load_ternary(source.path)
        how = "packed export"
        files = {}
    elif args.train_minutes > 0:
        export = train_briefly(args.model, work / "trained", args.train_minutes, spec, args.lr)
        model, tokenizer = load_ternary(export)
        # the original is the control row and says how far the short training got
        original, _ = load_model(args.model)
        how = f"{args.train_minutes:g} min CPU distillation on WikiText-2 valid, lr {args.lr:g}"
        files = {q: export / gguf_filename(q) for q in ("tq2_0", "tq1_0")}  # written by the recipe's exporters
    else:
        original, tokenizer = load_model(args.model)
        model, _ = load_model(args.model)
        convert_to_bitnet(model, spec)
        model.eval()
        how = "post-training ternary, no training"
        files = {}
    # the GGUF reuses the tokenizer of the file the model came from, as the exporters do
    src_gguf = source.path / source.gguf_file if source.kind in ("embedded", "gguf") else None
    if source.kind == "ternary":
        src_gguf = source_gguf(source.path)
    windows = token_windows(tokenizer, args.text, args.seq_len, args.windows)
    ours, torch_seconds = torch_logits(model, windows)
    log.info("bitconvert: %d windows in %.1f s", len(windows), torch_seconds)

    for qtype in ("tq2_0", "tq1_0"):
        path = files.get(qtype)
        types = None
        if path is None or not path.is_file():
            path = work / gguf_filename(qtype)
            report = export_gguf(model, tokenizer, path, qtype, tokenizer_gguf=src_gguf)
            types = {t: list(report.tensor_types.values()).count(t) for t in sorted(set(report.tensor_types.values()))}
            for reason, names in report.fallbacks.items():
                notes.append(f"{qtype}: {len(names)} tensors: {reason}")
        else:
            types, fallbacks = file_tensor_types(path, qtype)
            notes += fallbacks
        theirs, timing = llama_cpp_logits(path, windows, args.threads, args.decode_tokens)
        rows.append({"name": f"bitconvert (int8 per-token activations) vs GGUF {qtype.upper()}",
                     "mib": path.stat().st_size / 2**20, "tensor_types": types,
                     "comparison": compare(ours, theirs, windows), "timing": timing})
        log.info("%s: %s", qtype, rows[-1]["comparison"])

    # Which of bitconvert's choices does llama.cpp reproduce? The same ternary weights with float
    # activations, and with activations quantized per block the way llama.cpp does it.
    tq2 = work / gguf_filename("tq2_0") if (work / gguf_filename("tq2_0")).is_file() else files["tq2_0"]
    theirs, _ = llama_cpp_logits(tq2, windows, args.threads, 1)
    for activations, label in (("float", "reference: same ternary weights, float activations (vs TQ2_0)"),
                               ("llama.cpp", "reference: same ternary weights, llama.cpp-style int8 activation "
                                             "blocks, F16 embedding (vs TQ2_0)")):
        reference, _ = torch_logits(float_twin(model, activations), windows)
        rows.append({"name": label, "comparison": compare(reference, theirs, windows)})
        log.info("%s: %s", label, rows[-1]["comparison"])

    if original is not None and src_gguf is not None:
        reference, _ = torch_logits(original, windows)
        theirs, timing = llama_cpp_logits(src_gguf, windows, args.threads, args.decode_tokens)
        rows.append({"name": f"control: original model in transformers vs its source {src_gguf.name}",
                     "mib": src_gguf.stat().st_size / 2**20, "comparison": compare(reference, theirs, windows),
                     "timing": timing})
        notes.append("Control: transformers runs the exact dequantized weights of the source GGUF, llama.cpp the "
                     "same file, so its disagreement is the runtimes' own (activation quantization, kernel order).")

    tokenization = tokenization_agreement(tq2, tokenizer, args.text.read_text(encoding="utf-8")[:2000])
    notes.append("Both runtimes score the same token ids; bitconvert quantizes activations per token to int8, "
                 "llama.cpp per block of 256 (TQ types) or 32 (Q8_0) inputs, so logits are close, not equal.")
    if src_gguf is not None:
        notes.append(f"The GGUF reuses the tokenizer metadata of {src_gguf.name}. For SmolLM2 that is pre-tokenizer "
                     "'smollm' (digits split one by one); transformers' tokenizer rebuilt from that GGUF lacks the "
                     "digit split, so token ids can differ on numbers.")
    results = {
        "model": args.model, "how": how, "spec": spec.model_dump(), "seq_len": args.seq_len, "windows": args.windows,
        "text": str(args.text), "threads": args.threads, "llama_cpp_version": llama_cpp.__version__,
        "machine": f"{platform.machine()}, torch {torch.__version__}", "bitconvert_seconds": torch_seconds,
        "rows": rows, "tokenization": tokenization, "notes": notes, "load_average_at_end": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gguf_llamacpp" + ("_trained" if args.train_minutes > 0 else "")
    stem += "_export" if source.kind == "ternary" else ""
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    if args.train_minutes > 0:  # the loss curve is the evidence of how far the short training got
        shutil.copyfile(export / "training" / "metrics.jsonl", args.out / f"{stem}_metrics.jsonl")
    print(markdown(results))


if __name__ == "__main__":
    main()
