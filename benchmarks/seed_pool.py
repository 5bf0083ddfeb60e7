#!/usr/bin/env python
"""Ablation rows repeated with other seeds, pooled: each configuration's mean and spread, and its difference
from the reference's mean against the noise of such a difference.

One PIQA score of a 300-step row moves ~1 point from one seed to the next, as much as most changes the rounds
measured; a change is only read as real once its mean over seeds differs from the reference's by more than that
noise. Rows are grouped by name with a trailing ``_seed_<n>`` dropped (no suffix is seed 0, the recipe's) and a
steps marker (``_4x``, ``_tracked``) dropped, and by steps; a group needs two seeds or more. Rows of several rounds
pool only where the rounds ran on one kind of GPU with the same teacher-text seeds (rounds 8-12 did).

Each configuration is also paired with the reference run of the same seed and steps, wherever both ran: the mean of
those paired PIQA differences, with its standard error, uses every budget at once (round 10's rows at four times
the steps pair with each other).

    python benchmarks/seed_pool.py [benchmarks/results/qat_round8.json ... qat_round12.json] \
        [--reference reference] [--out benchmarks/results]

Writes OUT/seed_pool.{json,md}. The noise of a difference of two means is the seeds' pooled standard deviation
times sqrt(1/n1 + 1/n2).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ROUNDS = tuple(RESULTS / f"qat_round{number}.json" for number in (8, 9, 10, 11, 12))
SEED_SUFFIX = re.compile(r"_seed_(\d+)$")
# the steps column says how long a row trained; these name markers only repeat it
STEPS_MARKERS = re.compile(r"(_\d+x)?(_tracked)?$")


def config_and_seed(name: str) -> tuple[str, int]:
    """``chat_teacher_text_4x_seed_2`` -> ('chat_teacher_text', 2); no suffix is seed 0."""
    match = SEED_SUFFIX.search(name)
    base, seed = (name[:match.start()], int(match.group(1))) if match else (name, 0)
    return STEPS_MARKERS.sub("", base), seed


def paired(groups: dict[tuple[str, int], dict[int, dict]], reference: str) -> list[dict]:
    """Each configuration against the reference run of the same steps and seed: the differences, their mean and
    the standard error of that mean (where two pairs or more)."""
    result = []
    for name in sorted({base for base, _ in groups} - {reference}):
        pairs = [(steps, seed, runs[seed], groups[(reference, steps)][seed])
                 for (base, steps), runs in sorted(groups.items()) if base == name
                 for seed in sorted(runs) if seed in groups.get((reference, steps), {})]
        if len(pairs) < 2:
            continue
        piqa = [run["piqa"] - ref["piqa"] for _, _, run, ref in pairs]
        result.append({"config": name, "pairs": [{"steps": steps, "seed": seed, "rounds": [run["round"], ref["round"]]}
                                                 for steps, seed, run, ref in pairs],
                       "piqa_differences": piqa, "piqa_mean_difference": statistics.mean(piqa),
                       "piqa_standard_error": statistics.stdev(piqa) / math.sqrt(len(piqa)),
                       "ppl_ratios": [run["ppl"] / ref["ppl"] for _, _, run, ref in pairs]})
    return result


def pool(reports: list[dict], reference: str = "reference") -> dict:
    """Groups of one configuration over seeds, each with its means, spreads and difference from the reference."""
    devices = sorted({report.get("device", "?") for report in reports})
    originals = [report["original_ppl"] for report in reports if report.get("original_ppl")]
    if originals and max(originals) - min(originals) > 1e-3 * min(originals):
        raise ValueError(f"the reports score different originals (perplexity {originals}): not one setup")
    original_ppl = originals[0] if originals else None
    groups: dict[tuple[str, int], dict[int, dict]] = {}
    for report in reports:
        for row in report["configs"]:
            if row.get("piqa_acc") is None or row.get("final_ppl") is None:
                continue  # skipped or failed
            base, seed = config_and_seed(row["name"])
            seeds = groups.setdefault((base, row["steps"]), {})
            if seed in seeds:
                raise ValueError(f"{row['name']} at {row['steps']} steps appears twice (in one report or two)")
            seeds[seed] = {"round": report.get("round"), "ppl": row["final_ppl"], "piqa": row["piqa_acc"]}
    pooled = []
    for (base, steps), seeds in groups.items():
        if len(seeds) < 2:
            continue
        runs = [seeds[seed] for seed in sorted(seeds)]
        piqa, ppl = [run["piqa"] for run in runs], [run["ppl"] for run in runs]
        pooled.append({"config": base, "steps": steps, "seeds": sorted(seeds),
                       "rounds": [run["round"] for run in runs], "ppl": ppl, "piqa": piqa,
                       "ppl_mean": statistics.mean(ppl), "piqa_mean": statistics.mean(piqa),
                       "piqa_sd": statistics.stdev(piqa)})
    if not pooled:
        raise ValueError("no configuration ran with two seeds or more")
    # the seeds' spread, pooled over every group (weighted by degrees of freedom)
    dof = sum(len(g["piqa"]) - 1 for g in pooled)
    sd = math.sqrt(sum((len(g["piqa"]) - 1) * g["piqa_sd"] ** 2 for g in pooled) / dof)
    base = next((g for g in pooled if g["config"] == reference), None)
    for group in pooled:
        if original_ppl:
            group["ppl_ratio"] = group["ppl_mean"] / original_ppl
        if base is not None and group is not base and group["steps"] == base["steps"]:
            group["piqa_minus_reference"] = group["piqa_mean"] - base["piqa_mean"]
            group["noise_of_difference"] = sd * math.sqrt(1 / len(group["piqa"]) + 1 / len(base["piqa"]))
            group["ppl_vs_reference"] = group["ppl_mean"] / base["ppl_mean"] - 1
    return {"devices": devices, "original_ppl": original_ppl,
            "original_piqa": next((r.get("original_piqa") for r in reports if r.get("original_piqa")), None),
            "reference": reference, "pooled_piqa_sd": sd, "pooled_dof": dof,
            "groups": sorted(pooled, key=lambda g: (g["config"] != reference, g["config"], g["steps"])),
            "paired": paired(groups, reference)}


def table(result: dict) -> str:
    lines = ["| config | steps | seeds | ppl per seed | ppl mean | × original | PIQA per seed | PIQA mean | "
             "vs reference (points) | noise (points) | ppl vs reference |",
             "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    if result["original_ppl"]:
        lines.append(f"| original | | | | {result['original_ppl']:.2f} | 1.000 | | {result['original_piqa']:.3f} | | | |")
    for g in result["groups"]:
        ratio = f"{g['ppl_ratio']:.3f}" if "ppl_ratio" in g else "—"
        versus = ("| | |" if "piqa_minus_reference" not in g else
                  f"{100 * g['piqa_minus_reference']:+.1f} | ±{100 * g['noise_of_difference']:.1f} | "
                  f"{100 * g['ppl_vs_reference']:+.1f}% |")
        lines.append(f"| {g['config']} | {g['steps']} | {', '.join(map(str, g['seeds']))} | "
                     f"{', '.join(f'{p:.2f}' for p in g['ppl'])} | {g['ppl_mean']:.2f} | {ratio} | "
                     f"{', '.join(f'{a:.3f}' for a in g['piqa'])} | {g['piqa_mean']:.3f} | {versus}")
    if result.get("paired"):
        lines += ["", f"Paired with the {result['reference']} run of the same steps and seed:", "",
                  "| config | pairs (steps/seed) | PIQA difference per pair (points) | mean | standard error | "
                  "ppl ratio per pair |", "| --- | --- | --- | ---: | ---: | --- |"]
        for p in result["paired"]:
            pairs = ", ".join(f"{q['steps']}/{q['seed']}" for q in p["pairs"])
            lines.append(f"| {p['config']} | {pairs} | "
                         f"{', '.join(f'{100 * d:+.1f}' for d in p['piqa_differences'])} | "
                         f"{100 * p['piqa_mean_difference']:+.1f} | {100 * p['piqa_standard_error']:.1f} | "
                         f"{', '.join(f'{r:.3f}' for r in p['ppl_ratios'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="*", type=Path, default=list(DEFAULT_ROUNDS))
    parser.add_argument("--reference", default="reference", help="the configuration the others are set against")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = pool([json.loads(path.read_text()) for path in args.reports], args.reference)
    result["reports"] = [path.name for path in args.reports]
    text = table(result)
    summary = (f"Seeds' pooled PIQA standard deviation {100 * result['pooled_piqa_sd']:.2f} points "
               f"({result['pooled_dof']} degrees of freedom); {', '.join(result['devices'])}; "
               f"reports: {', '.join(result['reports'])}.")
    print(text + "\n\n" + summary)
    atomic_write_json(args.out / "seed_pool.json", result)
    atomic_write_text(args.out / "seed_pool.md", f"# Ablation rows pooled over seeds\n\n{text}\n\n{summary}\n")


if __name__ == "__main__":
    main()
