"""The CPU product of a packed model's int8 codes: torch's int8 matmul against float32 sgemm of the codes.

bitconvert's CPU path keeps each ternary weight as int8 codes (``TernaryCache("int8")``) and multiplies
them by the int8 activation codes exactly, through whichever of ``torch._int_mm`` and float32 sgemm the first
product of a process times faster (``bitconvert.kernels.ternary._int_matmul``). Which one wins depends on
the CPU (VNNI or not). This script measures, side by side in one run on this machine:

- each SmolLM2-135M projection shape at batch 1, 8 and 64, both products (median of repeats, ms);
- a forward pass of a packed SmolLM2-135M (8 sequences x 40 tokens) with each product forced, and with the
  choice bitconvert makes, against the original model in float32.

    python benchmarks/cpu_int8_products.py --out benchmarks/results      # a few minutes on 2 cores

Writes ``cpu_int8_products.json`` and ``cpu_int8_products.md`` under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down
BATCHES = [1, 8, 64]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def product_rows(repeats: int) -> list[dict]:
    from bitconvert.kernels import ternary as cpu_path

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        w = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        for m in BATCHES:
            x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
            exact = (x.long() @ w.long().t()).float()
            int_mm, sgemm = cpu_path._int_mm(x, w), cpu_path._float_matmul(x, w)
            row = {"out": n, "in": k, "batch": m, "float32_sgemm_ms": median_ms(lambda: cpu_path._float_matmul(x, w), repeats),
                   "float32_exact": bool(torch.equal(sgemm, exact))}
            if int_mm is not None:
                row["int_mm_ms"] = median_ms(lambda: cpu_path._int_mm(x, w), repeats)
                row["int_mm_exact"] = bool(torch.equal(int_mm, exact))
            rows.append(row)
            print(f"  {n}x{k} b{m}: sgemm {row['float32_sgemm_ms']:.3f} ms, _int_mm {row.get('int_mm_ms', float('nan')):.3f} ms",
                  flush=True)
    return rows


def forward_rows(repeats: int) -> dict:
    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary
    from bitconvert.kernels import ternary as cpu_path
    from bitconvert.quant import QuantSpec
    from bitconvert.sources import load_model

    ids = torch.randint(0, 1000, (8, 40), generator=torch.Generator().manual_seed(1))
    original, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    timings = {}
    with torch.no_grad():
        timings["original_fp32_s"] = median_ms(lambda: original(ids), repeats) / 1e3
        spec = QuantSpec(weight_scale="channel")
        convert_to_bitnet(original, spec, [])
        with tempfile.TemporaryDirectory() as folder:
            export_ternary(original, tokenizer, Path(folder) / "tern", spec, provenance={"source": "smollm2-135m"})
            packed, _ = load_model(Path(folder) / "tern", dtype=torch.float32, device="cpu")
        logits = {}
        for label, choice in (("packed_int_mm_s", True), ("packed_float32_sgemm_s", False), ("packed_bitconvert_choice_s", None)):
            cpu_path._int_mm_faster = choice
            if choice is None:
                packed(ids)  # the first product times both and decides
                timings["bitconvert_choice"] = "torch._int_mm" if cpu_path._int_mm_faster else "float32 sgemm"
            timings[label] = median_ms(lambda: packed(ids), repeats) / 1e3
            logits[label] = packed(ids).logits
            print(f"  {label}: {timings[label]:.2f} s", flush=True)
        timings["logits_identical"] = all(torch.equal(v, logits["packed_int_mm_s"]) for v in logits.values())
    return timings


def markdown(data: dict) -> str:
    lines = ["# CPU products of int8 codes: torch._int_mm vs float32 sgemm", "", data["machine"], "",
             "Random int8 activation codes times ternary codes, median ms; both results checked against an int64 product.",
             "", "| out x in | batch | float32 sgemm ms | torch._int_mm ms | _int_mm / sgemm | both exact |",
             "|---|---|---|---|---|---|"]
    for r in data["products"]:
        ratio = f"{r['int_mm_ms'] / r['float32_sgemm_ms']:.1f}x" if "int_mm_ms" in r else ""
        lines.append(f"| {r['out']}x{r['in']} | {r['batch']} | {r['float32_sgemm_ms']:.3f} | {r.get('int_mm_ms', float('nan')):.3f} "
                     f"| {ratio} | {r['float32_exact'] and r.get('int_mm_exact', True)} |")
    f = data["forward"]
    lines += ["", "Forward pass, SmolLM2-135M (post-training ternary, per-channel scales), 8 x 40 tokens, median seconds:", "",
              "| model | seconds | vs original fp32 |", "|---|---|---|",
              f"| original, float32 | {f['original_fp32_s']:.2f} | 1.00x |"]
    for label, name in (("packed_int_mm_s", "packed, torch._int_mm"), ("packed_float32_sgemm_s", "packed, float32 sgemm"),
                        ("packed_bitconvert_choice_s", f"packed, bitconvert's choice ({f['bitconvert_choice']})")):
        lines.append(f"| {name} | {f[label]:.2f} | {f[label] / f['original_fp32_s']:.2f}x |")
    lines += ["", f"The three packed runs give identical logits: {f['logits_identical']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    data = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"}
    print("# products", flush=True)
    data["products"] = product_rows(args.repeats)
    print("# forward", flush=True)
    data["forward"] = forward_rows(max(3, args.repeats // 3))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_int8_products.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "cpu_int8_products.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
