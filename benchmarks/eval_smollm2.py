"""SmolLM2-135M, original vs ternary, scored with lm-evaluation-harness: one call, one GPU.

Converts the model (distillation on WikiText-2 valid.txt for --train-minutes; 0 = post-training
ternary with no training) or takes an existing export (--ternary), then runs ``bitconvert eval``'s
library function on PIQA (all 1838 validation items, the harness's piqa prompt via piqa_local),
WikiText-2 test (the harness's wikitext task on the local tokenized file, wikitext_local) and the
token perplexity of WikiText-2 test.txt as one stream. ARC and HellaSwag run too when the data
folder holds them. Writes eval_smollm2.json and eval_smollm2.md under --out and prints the table.

    python benchmarks/eval_smollm2.py --data-dir ../shared/data --out $OUT/eval_smollm2 --train-minutes 4
    python benchmarks/eval_smollm2.py --data-dir ../shared/data --out /tmp/smoke --train-minutes 0 \
        --limit 4 --max-length 512 --device cpu      # CPU smoke test, a few minutes
    (add --train-batch-size 2 --train-seq-len 128 to smoke-test the distillation on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.api import quantize  # noqa: E402
from bitconvert.eval import EvalError, evaluate, find_task_file  # noqa: E402
from bitconvert.eval.data import resolve_data_dir  # noqa: E402
from bitconvert.recipes.loading import recipe_from_dict  # noqa: E402

ALWAYS = ["piqa_local", "wikitext_local"]
IF_PRESENT = ["arc_easy_local", "arc_challenge_local", "hellaswag_local"]


def conversion_recipe(args, data_dir: Path, export_dir: Path):
    """The best short recipe known from the calibration notes (per-channel scales, quant warmup, KL + 0.5 CE)."""
    train = {"mode": "none"} if args.train_minutes <= 0 else {
        "mode": "distill", "minutes": args.train_minutes, "batch_size": args.train_batch_size, "lr": 1e-3, "schedule": "cosine",
        "warmup_steps": 20, "quant_warmup_steps": 100, "loss": {"kl": 1.0, "ce": 0.5}, "log_every": 10,
        "save_every": 0, "save_every_minutes": 0}
    return recipe_from_dict({
        "model": args.model, "output": str(export_dir), "device": args.device,
        "convert": {"weight_scale": "channel"},
        "data": {"train": [{"path": str(data_dir / "wikitext-2" / "valid.txt")}], "sequence_length": args.train_seq_len},
        "train": train, "export": {"formats": ["packed"]},
    }, [], source="benchmarks/eval_smollm2.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="original model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--ternary", type=Path, help="existing ternary export to score instead of converting")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("BITCONVERT_DATA"),
                        help="folder with piqa/ and wikitext-2/ (default: $BITCONVERT_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="where eval_smollm2.{json,md} go")
    parser.add_argument("--export-dir", type=Path, help="where the conversion is written (default: a temp folder)")
    parser.add_argument("--train-minutes", type=float, default=4.0, help="distillation budget; 0 = no training")
    parser.add_argument("--train-batch-size", type=int, default=32, help="sequences per step (32 x 512 needs a GPU)")
    parser.add_argument("--train-seq-len", type=int, default=512, help="tokens per training sequence")
    parser.add_argument("--limit", type=int, help="first N items per task / N windows per text file (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=32)
    # The harness log-softmaxes a whole batch of windows at once: batch x max_length x vocab (49152) in fp32,
    # 13 GB at 32 x 2048; the model's own 8192 would need 52 GB.
    parser.add_argument("--max-length", type=int, default=2048, help="context window for perplexity windows")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--no-cache", action="store_true", help="re-score the original instead of using the cache")
    args = parser.parse_args()

    if args.data_dir is None:
        parser.error("give --data-dir (or set BITCONVERT_DATA): the folder with piqa/ and wikitext-2/")
    data_dir = resolve_data_dir(args.data_dir)
    tasks = ALWAYS + [t for t in IF_PRESENT if _has_data(t, data_dir)]
    started = time.perf_counter()
    conversion = None
    if args.ternary is not None:
        export_dir = args.ternary
    else:
        export_dir = args.export_dir or Path(tempfile.mkdtemp(prefix="eval_smollm2_")) / "ternary"
        recipe = conversion_recipe(args, data_dir, export_dir)
        t0 = time.perf_counter()
        result = quantize(recipe)
        conversion = {"recipe": recipe.model_dump(), "seconds": time.perf_counter() - t0,
                      "summary": result.report.summary(),
                      "train": None if result.train is None else {
                          "steps": result.train.steps, "tokens": result.train.tokens, "seconds": result.train.seconds}}
        print(f"converted in {conversion['seconds']:.0f} s: {conversion['summary']}", flush=True)

    t0 = time.perf_counter()
    report = evaluate(export_dir, baseline=args.model, tasks=tasks,
                      perplexity_files=[data_dir / "wikitext-2" / "test.txt"], limit=args.limit,
                      batch_size=args.batch_size, device=args.device, data_dir=data_dir, max_length=args.max_length,
                      use_cache=not args.no_cache)
    eval_seconds = time.perf_counter() - t0
    device = report.settings["device"]
    on_gpu = device.startswith("cuda")
    hardware = torch.cuda.get_device_name(torch.device(device)) if on_gpu else platform.processor() or "cpu"
    skipped = [t for t in IF_PRESENT if t not in tasks]

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(sys.argv), "hardware": hardware, "export_dir": str(export_dir),
               "conversion": conversion, "eval_seconds": eval_seconds, "total_seconds": time.perf_counter() - started,
               "skipped_tasks": skipped, "report": report.to_dict()}
    (args.out / "eval_smollm2.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    how = ("an existing export" if conversion is None else
           "post-training ternary (no training)" if conversion["train"] is None else
           f"distilled for {conversion['train']['seconds']:.0f} s ({conversion['train']['steps']} steps, "
           f"{conversion['train']['tokens']:,} tokens of WikiText-2 valid.txt), per-channel scales")
    lines = ["# SmolLM2-135M: original vs BitNet b1.58 ternary (lm-evaluation-harness)", "",
             f"- original: `{args.model}`" + (" (SmolLM2-135M-Instruct from the embedded Q4_1 GGUF, dequantized: "
                                             "not the FP16 release)" if args.model == "smollm2-135m" else "")
             + f"; ternary: {how}",
             f"- {hardware}, {report.settings['dtype']}, batch {args.batch_size}, max length {args.max_length}, "
             f"limit {args.limit or 'none'}; eval took {eval_seconds:.0f} s",
             f"- command: `{payload['command']}`", "", report.markdown(), ""]
    lines += [f"- {note}" for note in report.notes]
    if skipped:
        lines += [f"- not run (no data in {data_dir}): {', '.join(skipped)}"]
    (args.out / "eval_smollm2.md").write_text("\n".join(lines) + "\n")
    print(report.table())
    print(f"wrote {args.out / 'eval_smollm2.json'} and {args.out / 'eval_smollm2.md'}")
    return 0


def _has_data(task: str, data_dir: Path) -> bool:
    try:
        find_task_file(task, data_dir)
    except EvalError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
