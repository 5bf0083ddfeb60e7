"""QAT ablations on SmolLM2-135M: one fixed wall-clock budget per configuration, one GPU, one call.

Every configuration starts from the same original model, trains by distillation on WikiText-2
valid.txt for the same number of seconds, and is scored by perplexity on WikiText-2 test.txt
(non-overlapping blocks, the same blocks for the original) and lm-eval PIQA. Prints a table and
writes ``<report>.json`` (per-configuration curves and timings) and ``<report>.md`` under --out
after every configuration, so that a call cut short keeps what it measured.

Round 1 (``--round 1``, report qat_ablations): one change at a time against the calibration runs'
recipe. Round 2 (``--round 2``, report qat_round2): the reference is the convert and train sections
of recipes/smollm2-gpu.yaml; one row draws half its blocks from a fresh teacher-text mix that the
static-cache sampler writes once, up front, for every row that uses it (its time is reported apart).
Round 3 (``--round 3``, report qat_round3): the recipe after its 10-minute run, every row with two
thirds of its blocks from fresh teacher text: attention-relation distillation at two weights,
2048-token training sequences (scored on the same 512-token blocks), edge blocks in bf16, weight
decay, the hidden-state loss, and half of the teacher text sampled from the start token alone.
Round 4 (``--round 4``, report qat_round4): where PIQA goes. The recipe as it now is (three quarters of the
blocks teacher text); two diagnostic rows keep all attention or all MLP layers in bf16, one leaves the
tied embeddings frozen (``train.freeze``), one drops the cross-entropy, one lowers the lr, one trains
four times the steps with PIQA scored along the way (PIQA against tokens), and two train the original
with no quantization at all (what the training alone costs PIQA).
Round 5 (``--round 5``, report qat_round5): what the issue lists that rounds 1-4 had not measured. The TWN fit of
codes and scales (``convert.ternary_fit``), BitNet b1.58 2B4T's two-stage lr and weight decay
(``train.schedule: two_stage``), a batch ramp (``train.batch_ramp``, same tokens as the reference, so more
steps), and SubLN before the output projections at 300 steps instead of round 1's 25 s.
Round 6 (``--round 6``, report qat_round6): how many inputs share a weight scale (groups of 16, 32, 64 and 192),
under BitNet's absmean fit and under TWN's.
Round 7 (``--round 7``, report qat_round7): the library's defaults. Against the recipe as it now is (TWN, groups
of 64): one scale per row and per tensor under TWN, the defaults `bitconvert quantize` had before, a repeat of two
rows with another seed, and per-row scales over four times the steps.
Round 8 (``--round 8``, report qat_round8): where PIQA's knowledge can come back from. PIQA is scored on two halves
(even and odd items): three quarters of the blocks from the teacher's own conversations (``generate.chat``, Magpie)
instead of its continuations of valid.txt lines; and, as a diagnostic only, a tenth of the blocks from PIQA's first
half as text (each goal with each of its two solutions, lm-eval's prompt, no labels): does distillation on a task's
own kind of input bring back the teacher's answers on the half the student never saw?
Round 9 (``--round 9``, report qat_round9): is round 8's chat lift real, and does half of it come at half the cost?
A third seed of round 8's reference and chat rows, and half the teacher text as conversations beside half as
continuations of valid.txt lines (the mix of recipes/smollm2-gpu.yaml since round 11), over three seeds.
Round 10 (``--round 10``, report qat_round10): that mix and the reference at four times the steps, side by side in one
call, the mix's PIQA scored along its run.
Round 11 (``--round 11``, report qat_round11): a fourth seed of the mix beside the reference at 300 steps.
Round 12 (``--round 12``, report qat_round12): a fifth seed of that pair, and a second seed of round 10's.
Round 13 (``--round 13``, report qat_round13): a trained step (``convert.ternary_fit: learned``, LSQ's gradient,
started at TWN's step) against the recipe's fixed TWN step, paired by seed on one machine (three seeds at 300 steps,
one pair at 1,200).
Round 14 (``--round 14``, report qat_round14): two more seeds of round 13's pair at 1,200 steps (19.7M tokens), and a
fourth at 300 steps.
``--deadline`` (Unix seconds) skips the configurations that would not finish before it.

    python benchmarks/qat_ablations.py --model /root/m/smol-hf --data .data/wikitext-2 --round 2 \
        --seconds 22 --deadline $(( $(date +%s) + 400 )) --out $OUT
    python benchmarks/qat_ablations.py ... --configs "" --throughput --throughput-settings sampling
    python benchmarks/qat_ablations.py ... --configs "" --throughput \
        --throughput-settings eager,compiled_model,compiled_blocks --report-name qat_step_compile

Throughput settings (each measured on its own, failures recorded, not fatal): ``sampling`` (teacher
text: transformers' generate() vs the decode loop, eager and CUDA graph, same batch and length),
``eager`` / ``compiled_quantizers`` (the two fake quantizers under torch.compile, round 1's
comparison) / ``compiled_blocks`` (each decoder block torch.compiled) / ``compiled_model``
(``train.compile: true``: the whole student torch.compiled by the loop): distillation tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.convert import convert_to_bitnet  # noqa: E402
from bitconvert.recipes.loading import recipe_from_dict  # noqa: E402
from bitconvert.recipes.schema import DataConfig, DataSource, GenerateSource, Recipe  # noqa: E402
from bitconvert.sources import load_model  # noqa: E402
from bitconvert.train.data import build_training_data, prompts_from_file  # noqa: E402
from bitconvert.train.sampling import (  # noqa: E402
    eos_token_ids,
    generate_texts,
    generation_top_k,
    sample_continuations,
    truncate_at_eos,
)
from bitconvert.train.loop import held_out_loss, train  # noqa: E402
from bitconvert.utils.io import atomic_write_text  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-gpu.yaml"


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


# Round 1's reference: the best recipe known before these ablations (calibration notes), one change per row below.
REFERENCE = {
    "convert": {"weight_scale": "channel"},
    "train": {"mode": "distill", "batch_size": 32, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 20,
              "quant_warmup_steps": 100, "loss": {"kl": 1.0, "ce": 0.5}, "log_every": 5, "save_every": 0,
              "save_every_minutes": 0},
}

ABLATIONS: dict[str, dict] = {
    "reference": {},
    "tensor_scale": {"convert": {"weight_scale": "tensor"}},
    "group64_scale": {"convert": {"weight_scale": "group", "group_size": 64}},
    "no_quant_warmup": {"train": {"quant_warmup_steps": 0}},
    "kl_only": {"train": {"loss": {"ce": 0.0}}},
    "plus_hidden": {"train": {"loss": {"hidden": 1.0}}},
    "temperature_2": {"train": {"loss": {"temperature": 2.0}}},
    "subln_output": {"convert": {"subln": "output"}},
    "lr_2e-3": {"train": {"lr": 2e-3}},
    "lr_3e-3": {"train": {"lr": 3e-3}},
    "lr_2e-3+temperature_2": {"train": {"lr": 2e-3, "loss": {"temperature": 2.0}}},
    "lr_5e-4": {"train": {"lr": 5e-4}},
    "batch_16": {"train": {"batch_size": 16}},
    "keep_edge_blocks": {"convert": {"skip": [r"model\.layers\.(0|29)\..*"]}},
    "teacher_text_mix": {"data": {"generate_mix": 0.3}},
}

# Round 2, in priority order (a deadline drops the tail). Two keys are the benchmark's own:
# data.teacher_mix (share of blocks from the shared fresh teacher text) and convert.keep_edge_blocks
# (the first and last decoder block stay in full precision, whatever the model's depth).
ROUND2_ABLATIONS: dict[str, dict] = {
    "reference": {},
    "teacher_mix_fresh": {"data": {"teacher_mix": 0.5}},
    "group64_scale": {"convert": {"weight_scale": "group", "group_size": 64}},
    "keep_edge_blocks": {"convert": {"keep_edge_blocks": True}},
    "lr_4e-3": {"train": {"lr": 4e-3}},
    "batch_64": {"train": {"batch_size": 64}},
    "min_lr_0": {"train": {"min_lr_ratio": 0.0}},
    "weight_decay_0.1": {"train": {"weight_decay": 0.1}},
    # Not in the default list: quant_strength is max(step / warmup, 2 x progress), so under ~400
    # steps (every short row) 100 and 200 warmup steps give the same schedule. Run it in long calls.
    "quant_warmup_200": {"train": {"quant_warmup_steps": 200}},
}
ROUND2_DEFAULT = [name for name in ROUND2_ABLATIONS if name != "quant_warmup_200"]

# Round 3: the recipe after the 10-minute run (group-64 scales, two thirds of the blocks teacher text), so
# every row draws two thirds of its blocks from fresh teacher text. data.sequence_length trains on
# longer blocks; every row is still scored on the same --sequence-length blocks of test.txt.
ROUND3_TEACHER = {"data": {"teacher_mix": 2 / 3}}
ROUND3_ABLATIONS: dict[str, dict] = {name: merge(ROUND3_TEACHER, change) for name, change in {
    "reference": {},
    "attention_relation_1": {"train": {"loss": {"attention": 1.0}}},
    "attention_relation_10": {"train": {"loss": {"attention": 10.0}}},
    "sequence_2048": {"data": {"sequence_length": 2048}, "train": {"batch_size": 8}},
    "keep_edge_blocks": {"convert": {"keep_edge_blocks": True}},
    "weight_decay_0.1": {"train": {"weight_decay": 0.1}},
    "plus_hidden": {"train": {"loss": {"hidden": 1.0}}},
    # half of the teacher text from the start token instead of WikiText prompts: broader than WikiText
    "open_teacher_text": {"data": {"teacher_mix": 1 / 3, "teacher_mix_open": 1 / 3}},
}.items()}

# Round 4: where does PIQA go? The recipe as it now is (three quarters of the blocks from fresh teacher text), and
# rows that keep one kind of layer in bf16 to locate the loss (diagnostics: not ternary models), leave the tied
# embeddings and head untouched, drop the cross-entropy on the data, or lower the learning rate. A benchmark-only
# key, "piqa_every", scores PIQA along a row (the loop's eval.track_every): PIQA against tokens in one run.
ROUND4_TEACHER = {"data": {"teacher_mix": 0.75}}
ROUND4_ABLATIONS: dict[str, dict] = {name: merge(ROUND4_TEACHER, change) for name, change in {
    "reference": {},
    "mlp_ternary_only": {"convert": {"skip": [r"model\.layers\.\d+\.self_attn\..*"]}},
    "attention_ternary_only": {"convert": {"skip": [r"model\.layers\.\d+\.mlp\..*"]}},
    "frozen_embeddings": {"train": {"freeze": ["embed_tokens"]}},
    "kl_only": {"train": {"loss": {"ce": 0.0}}},
    "lr_1e-3": {"train": {"lr": 1e-3}},
    "lr_3e-4": {"train": {"lr": 3e-4}},
    "reference_4x_tracked": {"train": {"steps_factor": 4}, "piqa_every": 300},
    # no quantization at all (the benchmark's own key): how much PIQA the training itself costs a bf16 model
    "full_precision": {"full_precision": True},
    "full_precision_lr_3e-4": {"full_precision": True, "train": {"lr": 3e-4}},
}.items()}

# Round 5: the schedules and the quantizer fit that rounds 1-4 left out, against the same reference as round 4. A
# benchmark-only key, "same_tokens", gives a row the reference's tokens instead of its steps (a batch ramp's small
# steps would otherwise train fewer tokens).
ROUND5_ABLATIONS: dict[str, dict] = {name: merge(ROUND4_TEACHER, change) for name, change in {
    "reference": {},
    "twn_fit": {"convert": {"ternary_fit": "twn"}},
    "two_stage_lr": {"train": {"schedule": "two_stage", "weight_decay": 0.1}},  # 2B4T: decay 0.1, none in stage 2
    "batch_ramp": {"train": {"batch_ramp": {"start": 8, "share": 0.25}}, "same_tokens": True},
    "subln_output": {"convert": {"subln": "output"}},
    "two_stage_lr_no_decay": {"train": {"schedule": "two_stage"}},
    "twn_fit_two_stage_lr": {"convert": {"ternary_fit": "twn"}, "train": {"schedule": "two_stage", "weight_decay": 0.1}},
    "twn_fit_4x_tracked": {"convert": {"ternary_fit": "twn"}, "train": {"steps_factor": 4}, "piqa_every": 300},
}.items()}

# Round 6: how many inputs share one weight scale, under each fit, against the same reference as rounds 4 and 5
# (groups of 64, absmean). The packed format keeps a float32 scale per group, 32 / group_size bits a weight: 0.17 at
# 192, 0.5 at 64, 1 at 32 and 2 at 16, on top of the codes' 2 bits. Every size here stays packable, and divides
# SmolLM2-135M's 576 and 1,536 inputs (128 would not divide 576).
ROUND6_ABLATIONS: dict[str, dict] = {name: merge(ROUND4_TEACHER, change) for name, change in {
    "reference": {},
    "group_32": {"convert": {"group_size": 32}},
    "twn_fit_group_32": {"convert": {"ternary_fit": "twn", "group_size": 32}},
    "twn_fit": {"convert": {"ternary_fit": "twn"}},
    "group_192": {"convert": {"group_size": 192}},
    "group_16": {"convert": {"group_size": 16}},
    "twn_fit_group_16": {"convert": {"ternary_fit": "twn", "group_size": 16}},
}.items()}

# Round 7: the library's defaults. Its reference is the recipe as it now is (TWN, groups of 64), not round 6's absmean.
# One scale per output row (channel) is what GGUF's TQ2_0 blocks of 256 hold exactly when a row's inputs are a
# multiple of 256, and one per tensor is what plain transformers loads; the old defaults row is what `bitconvert
# quantize` trained with before this round (per-tensor absmean, lr 1e-3, 8 sequences a step), on the same tokens.
ROUND7_ABLATIONS: dict[str, dict] = {name: merge(ROUND4_TEACHER, change) for name, change in {
    "reference": {},
    "channel_scale": {"convert": {"weight_scale": "channel"}},
    "old_defaults": {"convert": {"weight_scale": "tensor", "ternary_fit": "absmean"},
                     "train": {"lr": 1e-3, "batch_size": 8}, "same_tokens": True},
    "tensor_scale": {"convert": {"weight_scale": "tensor"}},
    "channel_scale_4x": {"convert": {"weight_scale": "channel"}, "train": {"steps_factor": 4}},
    "reference_seed_1": {"train": {"seed": 1}},
    "channel_scale_seed_1": {"convert": {"weight_scale": "channel"}, "train": {"seed": 1}},
}.items()}

# Round 8: where PIQA's knowledge can come back from. Distillation restores the teacher's behaviour on the inputs
# it sees; rounds 1-7 varied how the student trains, never what the teacher is asked about beyond WikiText. The
# reference is round 7's. "teacher_mix_chat" is the teacher's own conversations (Magpie: the chat template up to the
# user's message, then the teacher writes both turns), the kind of text an instruct model was tuned on, in place of
# its continuations of valid.txt lines. "piqa_half_a" (a diagnostic, not a recipe: it trains on the evaluation's
# own items) is a tenth of the blocks from the even-numbered PIQA items as lm-eval writes them, both solutions,
# no labels; every row of the round is scored on each half, so the odd half measures what transfers.
CHAT_TEACHER = {"data": {"teacher_mix_chat": 0.75}}
ROUND8_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,
    "chat_teacher_text": CHAT_TEACHER,
    "piqa_half_a_text": merge(ROUND4_TEACHER, {"data": {"piqa_half_a": 0.1}}),
    "chat_teacher_text_4x": merge(CHAT_TEACHER, {"train": {"steps_factor": 4}}),
    "chat_teacher_text_seed_1": merge(CHAT_TEACHER, {"train": {"seed": 1}}),
    "reference_seed_1": merge(ROUND4_TEACHER, {"train": {"seed": 1}}),
}

# Round 9: round 8's chat rows read +2 PIQA points over two seeds, ~1.5x the noise of the difference, at +5%
# perplexity. A third seed of each, and the mix recipes/smollm2-gpu.yaml has trained on since round 11 (conversations
# for half the teacher text, continuations of valid.txt lines for the other half) over three seeds. Same fresh-text
# seeds as round 8, so its rows join these where both ran on one kind of GPU.
CHAT_AND_WIKI = {"data": {"teacher_mix": 0.375, "teacher_mix_chat": 0.375}}
ROUND9_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # round 8 ran it (seed 0); here it names the data that `--set` can reach
    "chat_and_wiki_teacher_text": CHAT_AND_WIKI,
    "chat_and_wiki_teacher_text_seed_1": merge(CHAT_AND_WIKI, {"train": {"seed": 1}}),
    "chat_teacher_text_seed_2": merge(CHAT_TEACHER, {"train": {"seed": 2}}),
    "reference_seed_2": merge(ROUND4_TEACHER, {"train": {"seed": 2}}),
    "chat_and_wiki_teacher_text_seed_2": merge(CHAT_AND_WIKI, {"train": {"seed": 2}}),
}

# Round 10: does the mix's lift of round 9 (+0.9 PIQA points over three seeds at 4.9M tokens) hold at four times
# the steps (19.7M tokens, a quarter of a 10-minute run), and its perplexity cost? The mix tracks PIQA along the run,
# as round 5's TWN row at four times the steps did; the reference beside it on the same machine and teacher text.
ROUND10_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # not a row: the step-speed measurement's configuration, as in round 9
    "chat_and_wiki_teacher_text_4x_tracked": merge(CHAT_AND_WIKI, {"train": {"steps_factor": 4}, "piqa_every": 300}),
    "reference_4x": merge(ROUND4_TEACHER, {"train": {"steps_factor": 4}}),
}

# Round 11: a fourth seed of the mix beside the reference at 4.9M tokens, after the mix's 10-minute run (a fifth
# pair for benchmarks/seed_pool.py). The mix then became recipes/smollm2-gpu.yaml's data; "reference" keeps naming
# continuations only (ROUND4_TEACHER), so that every round's rows still compare with one another.
ROUND11_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # not a row: the step-speed measurement's configuration, as in round 9
    "reference_seed_3": merge(ROUND4_TEACHER, {"train": {"seed": 3}}),
    "chat_and_wiki_teacher_text_seed_3": merge(CHAT_AND_WIKI, {"train": {"seed": 3}}),
}

# Round 12: a second seed of round 10's pair at four times the steps (19.7M tokens), since the mix's PIQA slope
# against tokens rested on one row there; and a fifth seed of the pair at 4.9M tokens. Both feed seed_pool.py and
# the mix's series in budget_curve.py. Its one call (device time ran short) ran only the 4.9M-token pair.
ROUND12_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # not a row: the step-speed measurement's configuration, as in round 9
    "chat_and_wiki_teacher_text_4x_seed_1": merge(CHAT_AND_WIKI, {"train": {"steps_factor": 4, "seed": 1}}),
    "reference_4x_seed_1": merge(ROUND4_TEACHER, {"train": {"steps_factor": 4, "seed": 1}}),
    "chat_and_wiki_teacher_text_seed_4": merge(CHAT_AND_WIKI, {"train": {"seed": 4}}),
    "reference_seed_4": merge(ROUND4_TEACHER, {"train": {"seed": 4}}),
}

# Round 13: a step the student learns. Every fit so far sets each block's step from its latent weights (absmean, TWN);
# ParetoQ, the strongest published ternary QAT, trains it instead, by LSQ's gradient. ``ternary_fit: learned`` starts
# at TWN's step (its least-squares step) and trains its log with the weights. Each row is paired with the recipe as it
# is (the mix, groups of 64, TWN's fixed step) on the same seed and the same teacher text, all on one machine: three
# seeds at 300 steps and one pair at four times the steps.
LEARNED_STEP = merge(CHAT_AND_WIKI, {"convert": {"ternary_fit": "learned"}})


def fixed_and_learned_step(suffix: str, train: dict | None = None) -> dict[str, dict]:
    """One pair of rows that differ only in the fit: the recipe's fixed TWN step, then the learned one."""
    change = {"train": train} if train else {}
    return {f"chat_and_wiki_teacher_text_same_call{suffix}": merge(CHAT_AND_WIKI, change),
            f"learned_step{suffix}": merge(LEARNED_STEP, change)}


ROUND13_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # not a row: the step-speed measurement's configuration, as in round 9
    **fixed_and_learned_step(""),
    **fixed_and_learned_step("_seed_1", {"seed": 1}),
    **fixed_and_learned_step("_4x", {"steps_factor": 4}),
    **fixed_and_learned_step("_seed_2", {"seed": 2}),
}

# Round 14: round 13's one pair at four times the steps, with two more seeds. A 10-minute run of the learned step would
# settle the recipe, but it did not fit the device time left; three pairs at 19.7M tokens say whether the gain holds
# beyond 4.9M tokens at all. Call 1 runs seed 1 (and samples the mix), call 2 seed 2 (REUSE_MIX=1). A fourth seed at 300
# steps fits a call when the device time left does not allow a pair at 1,200.
ROUND14_ABLATIONS: dict[str, dict] = {
    "reference": ROUND4_TEACHER,  # not a row: the step-speed measurement's configuration, as in round 9
    **fixed_and_learned_step("_4x_seed_1", {"steps_factor": 4, "seed": 1}),
    **fixed_and_learned_step("_4x_seed_2", {"steps_factor": 4, "seed": 2}),
    **fixed_and_learned_step("_seed_3", {"seed": 3}),
}

# What the benchmark changes in every row: budget, logging, no mid-run checkpoints.
ROW_TRAIN = {"log_every": 5, "save_every": 0, "save_every_minutes": 0}


def recipe_reference(path: Path = RECIPE) -> dict:
    """The convert and train sections of a recipe file (its data section is the benchmark's)."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    train = {k: v for k, v in recipe.get("train", {}).items() if k not in ("minutes", "steps", "tokens", "eval_every")}
    return {"convert": recipe.get("convert", {}), "train": {**train, **ROW_TRAIN}}


# Rounds 2-6 ran while the recipe fitted codes and scales with BitNet's absmean; their reference keeps that fit, so
# that they reproduce against what they measured (the recipe has used TWN since its 10-minute run).
ABSMEAN_FIT = {"convert": {"ternary_fit": "absmean"}}


def rows_but_reference(ablations: dict[str, dict]) -> list[str]:
    """A round whose reference ran in an earlier round names it only for the step-speed measurement and `--set`."""
    return [name for name in ablations if name != "reference"]


# The rounds measured against the recipe file: (ablations, default configuration list, report name).
RECIPE_ROUNDS = {
    2: (ROUND2_ABLATIONS, ROUND2_DEFAULT, "qat_round2"),
    3: (ROUND3_ABLATIONS, list(ROUND3_ABLATIONS), "qat_round3"),
    4: (ROUND4_ABLATIONS, list(ROUND4_ABLATIONS), "qat_round4"),
    5: (ROUND5_ABLATIONS, list(ROUND5_ABLATIONS), "qat_round5"),
    6: (ROUND6_ABLATIONS, list(ROUND6_ABLATIONS), "qat_round6"),
    7: (ROUND7_ABLATIONS, list(ROUND7_ABLATIONS), "qat_round7"),
    8: (ROUND8_ABLATIONS, list(ROUND8_ABLATIONS), "qat_round8"),
    9: (ROUND9_ABLATIONS, rows_but_reference(ROUND9_ABLATIONS), "qat_round9"),
    10: (ROUND10_ABLATIONS, rows_but_reference(ROUND10_ABLATIONS), "qat_round10"),
    11: (ROUND11_ABLATIONS, rows_but_reference(ROUND11_ABLATIONS), "qat_round11"),
    12: (ROUND12_ABLATIONS, rows_but_reference(ROUND12_ABLATIONS), "qat_round12"),
    13: (ROUND13_ABLATIONS, rows_but_reference(ROUND13_ABLATIONS), "qat_round13"),
    14: (ROUND14_ABLATIONS, rows_but_reference(ROUND14_ABLATIONS), "qat_round14"),
}


def round_settings(number: int) -> tuple[dict, dict[str, dict], list[str], str]:
    """(reference, ablations, default configuration list, report name) of one round."""
    if number == 1:
        return REFERENCE, ABLATIONS, list(ABLATIONS), "qat_ablations"
    ablations, defaults, report = RECIPE_ROUNDS[number]
    reference = recipe_reference() if number >= 7 else merge(recipe_reference(), ABSMEAN_FIT)
    return reference, ablations, defaults, report


def spec_for(name: str, args, with_mix: bool = True) -> dict:
    """The recipe dict of one configuration (before validation); ``with_mix=False`` leaves the teacher-text
    shares out (valid.txt alone), for measurements that do not depend on the text."""
    spec = merge(args.reference, args.ablations[name])
    spec.pop("piqa_every", None)  # the benchmark's own keys (run_config)
    spec.pop("full_precision", None)
    same_tokens = spec.pop("same_tokens", False)
    steps_factor = spec["train"].pop("steps_factor", 1)
    data_change = spec.pop("data", {}) if with_mix else {}
    if spec["convert"].pop("keep_edge_blocks", False):
        spec["convert"]["skip"] = [rf"model\.layers\.(0|{args.num_layers - 1})\..*"]
    # each mix key is a share of the training blocks; valid.txt has the rest
    sources = []
    if data_change.get("generate_mix"):
        # Round 1: the teacher continues the first 32 tokens of WikiText lines inside the row.
        sources.append({"generate": {"tokens": args.generate_tokens, "sequence_length": args.sequence_length,
                                     "batch_size": 512, "prompts_from": str(args.data / "valid.txt")},
                        "weight": data_change["generate_mix"]})
    for kind in (*MIX_KINDS, PIQA_HALF):
        if data_change.get(kind):
            path = args.mix_files.get(kind)
            if path is None or not path.is_file():
                raise RuntimeError(f"no fresh teacher text for {kind}: the up-front sampling did not run or wrote nothing")
            sources.append({"path": str(path), "weight": data_change[kind]})
    rest = 1 - sum(source["weight"] for source in sources)
    if rest <= 0:
        raise ValueError(f"{name}: the teacher-text shares leave nothing for valid.txt")
    sources.insert(0, {"path": str(args.data / "valid.txt"), "weight": rest})
    spec["data"] = {"train": sources, "eval": {"path": str(args.data / "test.txt")},
                    "sequence_length": data_change.get("sequence_length", args.sequence_length),
                    "eval_sequence_length": args.sequence_length}
    spec["model"] = str(args.model)
    if args.steps and same_tokens:  # the reference's tokens: its steps times its sequences times their length
        reference_train = merge(args.reference, args.ablations.get("reference", {}))["train"]
        spec["train"]["tokens"] = (args.steps * steps_factor * reference_train.get("batch_size", 8)
                                   * reference_train.get("grad_accum", 1) * spec["data"]["sequence_length"])
    elif args.steps:
        spec["train"]["steps"] = args.steps * steps_factor
    else:
        spec["train"]["minutes"] = steps_factor * args.seconds / 60
    spec["train"]["eval_every"] = args.eval_every
    return spec


def row_seconds(name: str, args) -> float:
    """The estimate of a row's training time, plus its PIQA scorings along the way (~--piqa-seconds each)."""
    change = args.ablations[name]
    factor = change.get("train", {}).get("steps_factor", 1)
    tracked = 0
    if change.get("piqa_every") and args.piqa_limit:
        steps = (args.steps or 0) * factor
        tracked = 1 + (steps // change["piqa_every"] if steps else 4)  # the teacher once, then along the row
    return args.seconds * factor + tracked * args.piqa_seconds


def recipe_for(name: str, args, with_mix: bool = True) -> Recipe:
    return recipe_from_dict(spec_for(name, args, with_mix), source=f"ablation {name}")


def is_settable(name: str, args) -> bool:
    """Expressible as `--set` overrides of the recipe: the same data as the round's reference row (round 3's
    reference mixes teacher text as the recipe does; a data-list change is not settable)."""
    change = args.ablations[name]
    same_data = change.get("data") == args.ablations.get("reference", {}).get("data")
    # longer rows compete unfairly, and an unquantized one is no conversion
    benchmark_only = {"piqa_every", "full_precision"} & set(change) or "steps_factor" in change.get("train", {})
    return same_data and not benchmark_only and not change.get("convert", {}).get("keep_edge_blocks")


def warm_up(student, data, device, batch_size: int = 2) -> None:
    """One forward/backward outside the clock: the fused quantizers (and compiled blocks) compile for
    this layer layout here, so that no configuration pays compile time out of its training budget."""
    student.to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        student(input_ids=data.batch(0, batch_size).to(device)).logits.float().mean().backward()
    student.zero_grad(set_to_none=True)
    student.to("cpu")


def piqa_tracker(tokenizer, args, half: str | None = None):
    """lm-eval's PIQA prompt (bitconvert's piqa_local on <data>/../piqa, or one half of it: split_piqa) for
    in-memory models: loaded once, then every row and every tracked step scores with the same tracker."""
    from bitconvert.eval import TaskTracker

    trackers = vars(args).setdefault("piqa", {})
    if half not in trackers:
        trackers[half] = TaskTracker(["piqa_local"], tokenizer, limit=args.piqa_limit if args.piqa_limit > 0 else None,
                                     batch_size=64, data_dir=args.data.parent if half is None else args.piqa_dirs[half])
    return trackers[half]


def piqa_accuracy(model, tokenizer, args, half: str | None = None) -> float | None:
    if not args.piqa_limit:
        return None
    tracker = piqa_tracker(tokenizer, args, half)
    was_training = model.training
    # eager, as the loop scores: PIQA's many batch shapes would spend the compiled blocks' recompile limit, and
    # every later row in this process would then train eager (rounds 4-6 lost half their tokens/s so)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        accuracy = tracker(model)["piqa_local/acc"]
    model.train(was_training)
    return accuracy


def scored_piqa(model, tokenizer, args, half: str | None = None) -> tuple[float | None, str | None]:
    """PIQA accuracy, or None and the error: a harness failure must not cost a row its perplexity."""
    try:
        return piqa_accuracy(model, tokenizer, args, half), None
    except Exception as err:
        print(f"  PIQA failed: {error_text(err)}", flush=True)
        return None, error_text(err)


def piqa_scores(model, tokenizer, args) -> dict:
    """``{"piqa_acc": ...}``; where PIQA is split (split_piqa) also each half's accuracy, and piqa_acc is then their
    mean weighted by the items scored (the whole set's accuracy). Failures are recorded, never raised."""
    if not getattr(args, "piqa_dirs", None):
        accuracy, error = scored_piqa(model, tokenizer, args)
        return {"piqa_acc": accuracy, **({"piqa_error": error} if error else {})}
    scores, errors = {}, []
    for half, items in args.piqa_items.items():
        scores[f"piqa_{half}"], error = scored_piqa(model, tokenizer, args, half)
        errors += [error] if error else []
    if errors:
        return {**scores, "piqa_acc": None, "piqa_error": "; ".join(errors)}
    counts = {half: min(items, args.piqa_limit) if args.piqa_limit > 0 else items for half, items in args.piqa_items.items()}
    scores["piqa_acc"] = sum(scores[f"piqa_{half}"] * n for half, n in counts.items()) / sum(counts.values())
    return scores


def split_piqa(args) -> None:
    """PIQA's even-numbered items (half a) and odd-numbered ones (half b), each a data folder of its own with the labels
    inline, and half a as training text (``PIQA_HALF``): lm-eval's prompt followed by each of the two solutions, as
    the harness scores them, with no label. A row that trains on it is scored on half b, which it never saw."""
    from bitconvert.eval.data import find_task_file, read_piqa

    items = read_piqa(find_task_file("piqa_local", args.data.parent))
    halves = {"a": items[0::2], "b": items[1::2]}
    args.piqa_dirs, args.piqa_items = {}, {}
    for half, rows in halves.items():
        args.piqa_dirs[half] = args.work / f"piqa-{half}"
        atomic_write_text(args.piqa_dirs[half] / "piqa" / "valid.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        args.piqa_items[half] = len(rows)
    texts = [f"Question: {row['goal']}\nAnswer: {row[solution]}" for row in halves["a"] for solution in ("sol1", "sol2")]
    args.mix_files[PIQA_HALF] = args.work / f"{PIQA_HALF}.jsonl"
    atomic_write_text(args.mix_files[PIQA_HALF], "".join(json.dumps({"text": text}) + "\n" for text in texts))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def run_config(name, args, original, teacher, tokenizer, accelerator_factory) -> dict:
    wall = time.perf_counter()
    recipe = recipe_for(name, args)
    accelerator = accelerator_factory()
    student = copy.deepcopy(original)
    full_precision = args.ablations[name].get("full_precision", False)
    report = None if full_precision else convert_to_bitnet(student, recipe.convert.quant_spec(), recipe.convert.skip)
    started = time.perf_counter()
    data = build_training_data(recipe.data, tokenizer, seed=0, cache_dir=args.work / "data", teacher=teacher,
                               device=accelerator.device)
    if args.eval_blocks:
        data.eval_blocks = data.eval_blocks[: args.eval_blocks]
    data_seconds = time.perf_counter() - started
    torch._dynamo.reset()  # every row compiles afresh, in warm_up (outside its clock), whatever ran before it
    warm_up(student, data, accelerator.device)
    track_every = args.ablations[name].get("piqa_every", 0) if args.piqa_limit else 0
    started = time.perf_counter()
    result = train(student, teacher, data, recipe.train, args.work / name, accelerator=accelerator, eval_batch_size=32,
                   tracker=piqa_tracker(tokenizer, args) if track_every else None, track_every=track_every)
    train_wall = time.perf_counter() - started
    rows = result.metrics
    piqa_curve = [(r["tokens"], r["tasks"]["piqa_local/acc"]) for r in rows if "piqa_local/acc" in r.get("tasks", {})]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][2:]
    curve = [(r["tokens"], r["eval_ppl"]) for r in rows if "eval_ppl" in r]
    started = time.perf_counter()
    if piqa_curve and piqa_curve[-1][0] == result.tokens and not getattr(args, "piqa_dirs", None):
        piqa = {"piqa_acc": piqa_curve[-1][1]}  # the loop scored the end already
    else:
        piqa = piqa_scores(accelerator.unwrap_model(result.model), tokenizer, args)
    piqa_seconds = time.perf_counter() - started
    out = {"name": name, "change": args.ablations[name], "all_ternary": not (full_precision or recipe.convert.skip),
           "settable": is_settable(name, args), "steps": result.steps, "tokens": result.tokens,
           "seconds": result.seconds, "data_seconds": round(data_seconds, 1),
           "eval_and_checkpoint_seconds": round(train_wall - result.seconds, 1),
           "tokens_per_second": statistics.median(speeds) if speeds else None,
           "converted_layers": len(report.converted) if report else 0,
           "kept_full_precision": len(report.skipped) if report else None,
           "pool_blocks": len(data.pool), **piqa, "piqa_seconds": round(piqa_seconds, 1),
           "peak_gib": peak_gib(), "final_ppl": curve[-1][1] if curve else None, "curve": curve,
           **({"piqa_curve": piqa_curve} if piqa_curve else {})}
    del student, accelerator, result, data
    shutil.rmtree(args.work / name, ignore_errors=True)  # ~2 GB of checkpoint per row
    free_memory()
    out["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return out


# --------------------------------------------------------------------------- throughput

def sampling_throughput(teacher, tokenizer, args, device) -> list[dict]:
    """Teacher-text tokens/s at one batch and length: transformers' generate() against the decode
    loop (eager, then CUDA graph), the same prompts (WikiText lines) and sampling settings. The
    teacher's mean NLL of each sampler's tokens checks that they draw from the same distribution."""
    batch, new = args.sampling_batch, args.sampling_new_tokens
    config = GenerateSource(tokens=batch * new, sequence_length=new, batch_size=batch,
                            prompts_from=str(args.data / "valid.txt"))
    table = prompts_from_file(config, tokenizer, seed=0)
    prompts = table[torch.arange(batch) % len(table)].to(device)
    eos = eos_token_ids(teacher, tokenizer)
    top_k = generation_top_k(teacher)

    def with_generate(new_tokens: int):
        out = teacher.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               temperature=config.temperature, top_p=config.top_p, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens // 4, pad_token_id=tokenizer.pad_token_id)
        return out[:, prompts.shape[1]:], None

    def with_loop(graph: bool):
        def run(new_tokens: int):
            sampled = sample_continuations(teacher, prompts, new_tokens=new_tokens, min_new_tokens=new_tokens // 4,
                                           temperature=config.temperature, top_k=top_k, top_p=config.top_p,
                                           eos_token_ids=eos, seed=1, cuda_graph=graph)
            return sampled.tokens, sampled.used_cuda_graph
        return run

    results = []
    for label, run in (("generate()", with_generate), ("decode loop, eager", with_loop(False)),
                       ("decode loop, CUDA graph", with_loop(True))):
        row = {"setting": f"sampling: {label}", "batch": batch, "new_tokens": new, "prompt_tokens": prompts.shape[1]}
        try:
            run(8)  # warm-up: kernels, cuBLAS handles, the graph path's capture machinery
            free_memory()
            synchronize(device)
            started = time.perf_counter()
            tokens, graph = run(new)
            synchronize(device)
            seconds = time.perf_counter() - started
            row.update(seconds=round(seconds, 2), tokens_per_second=batch * tokens.shape[1] / seconds,
                       peak_gib=peak_gib(), teacher_nll=round(sample_nll(teacher, prompts, tokens, eos), 4),
                       mean_tokens_before_eos=round(statistics.mean(map(len, truncate_at_eos(tokens.cpu(), eos))), 1))
            if graph is not None:
                row["used_cuda_graph"] = graph
        except Exception as err:  # recorded, the benchmark goes on
            row["error"] = error_text(err)
        results.append(row)
        print(f"  {row['setting']:34s} " + (f"{row['tokens_per_second']:>10,.0f} tok/s  nll {row['teacher_nll']:.3f}"
                                            if "error" not in row else f"failed: {row['error'][:200]}"), flush=True)
        free_memory()
    return results


@torch.no_grad()
def sample_nll(model, prompts: torch.Tensor, tokens: torch.Tensor, eos_ids: list[int], rows: int = 64) -> float:
    """Mean negative log-likelihood under ``model`` of the sampled tokens before each row's EOS."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for i, row in enumerate(truncate_at_eos(tokens.cpu(), eos_ids)):
        keep[i, len(row):] = False
    total, count = 0.0, 0
    for start in range(0, len(tokens), rows):
        ids = torch.cat([prompts[start:start + rows], tokens[start:start + rows]], dim=1)
        logits = model(input_ids=ids, use_cache=False).logits[:, prompts.shape[1] - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[start:start + rows], reduction="none")
        mask = keep[start:start + rows].to(nll.device)
        total += nll[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


STEP_SETTINGS = ("eager", "compiled_quantizers", "compiled_blocks", "compiled_model")


def step_throughput(setting: str, args, original, teacher, tokenizer, accelerator_factory) -> dict:
    """Distillation tokens/s of the reference configuration with one compile setting."""
    import bitconvert.layers.bitlinear as bl

    recipe = recipe_for("reference", args, with_mix=False)  # step speed does not depend on the text
    data = build_training_data(recipe.data, tokenizer, seed=0, cache_dir=args.work / "data")
    data.eval_blocks = None
    cfg = recipe.train.model_copy(update={"minutes": None, "steps": args.throughput_steps, "eval_every": 0,
                                          "log_every": 1, "compile": setting == "compiled_model"})
    eager = (bl.activation_ste, bl.weight_ste)
    if setting == "compiled_quantizers":
        bl.activation_ste = torch.compile(bl.activation_ste, dynamic=True)  # BitLinear looks these up per call
        bl.weight_ste = torch.compile(bl.weight_ste, dynamic=True)
    try:
        accelerator = accelerator_factory()
        student = copy.deepcopy(original)
        convert_to_bitnet(student, recipe.convert.quant_spec())
        if setting == "compiled_blocks":
            for block in decoder_blocks(student):
                block.compile()
        started = time.perf_counter()
        # at the training batch size: compiled code is specialised to the shapes it first sees
        warm_up(student, data, accelerator.device, batch_size=cfg.batch_size)
        warm_seconds = time.perf_counter() - started
        result = train(student, teacher, data, cfg, args.work / f"tp-{setting}", accelerator=accelerator)
        rows = [r for r in result.metrics if "tokens_per_second" in r]
        speeds = [r["tokens_per_second"] for r in rows][3:]
        out = {"setting": setting, "tokens_per_second": statistics.median(speeds), "steps": result.steps,
               "batch": cfg.batch_size, "sequence_length": data.sequence_length, "peak_gib": peak_gib(),
               "warm_up_seconds": round(warm_seconds, 1), "first_step_seconds": round(rows[0]["elapsed"], 2),
               "final_loss": rows[-1].get("loss")}
        del student, accelerator, result
    finally:
        bl.activation_ste, bl.weight_ste = eager
        shutil.rmtree(args.work / f"tp-{setting}", ignore_errors=True)
        free_memory()
    return out


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The repeated decoder blocks (``model.layers`` in Llama-style models)."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers to compile block by block")
    return blocks


# --------------------------------------------------------------------------- fresh teacher text

# Fresh teacher text that rows mix in (data.<kind>: share of the blocks), each sampled once up front:
# continuing the first 32 tokens of WikiText lines, or from the start token alone (what the model writes
# unprompted: broader than WikiText).
MIX_KINDS = {"teacher_mix": "continues valid.txt lines", "teacher_mix_open": "from the start token alone",
             "teacher_mix_chat": "the teacher's own conversations, from its chat template (Magpie)"}
PIQA_HALF = "piqa_half_a"  # round 8's diagnostic text: the even-numbered PIQA items (split_piqa)


def sample_teacher_mix(teacher, tokenizer, args, device, deadline: float | None, kind: str = "teacher_mix") -> dict:
    """Up to --mix-tokens of teacher text of one kind (MIX_KINDS), written once to a jsonl that every
    row with data.<kind> reads. Batch by batch, stopping before one would pass --mix-seconds or
    the deadline; each batch has its own seed, so no two draw the same continuations."""
    per_batch = args.mix_batch_size * args.sequence_length
    wanted = max(1, math.ceil(args.mix_tokens / per_batch))
    texts: list[str] = []
    times: list[float] = []
    for batch in range(wanted):
        if times and (sum(times) + max(times) > args.mix_seconds
                      or (deadline is not None and time.time() + max(times) > deadline)):
            break
        prompts = str(args.data / "valid.txt") if kind == "teacher_mix" else None
        config = GenerateSource(tokens=per_batch, sequence_length=args.sequence_length,
                                batch_size=args.mix_batch_size, prompts_from=prompts, chat=kind == "teacher_mix_chat")
        started = time.perf_counter()
        texts.extend(generate_texts(teacher, tokenizer, config, seed=args.mix_seed + batch, device=device))
        synchronize(device)
        times.append(time.perf_counter() - started)
    args.mix_files[kind] = args.work / f"{kind}.jsonl"
    atomic_write_text(args.mix_files[kind], "".join(json.dumps({"text": t}) + "\n" for t in texts))
    sampled = len(times) * per_batch
    return {"tokens_sampled": sampled, "texts": len(texts), "batches": len(times), "batches_wanted": wanted,
            "batch_size": args.mix_batch_size, "new_tokens_per_text": args.sequence_length,
            "seconds": round(sum(times), 1), "tokens_per_second": sampled / sum(times) if times else None}


# --------------------------------------------------------------------------- main

def error_text(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-3:]
    return f"{type(err).__name__}: {err} (at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where)) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BITCONVERT_DATA", ".data")) / "wikitext-2")
    parser.add_argument("--round", type=int, choices=(1, *RECIPE_ROUNDS), default=1, help="which set of configurations")
    parser.add_argument("--seconds", type=float, default=40, help="training seconds per configuration")
    parser.add_argument("--steps", type=int, default=None,
                        help="train every configuration for this many steps instead (--seconds then only estimates "
                             "a row's time for --deadline): same tokens for all, whatever the GPU's speed does")
    parser.add_argument("--eval-every", type=int, default=40, help="steps between held-out checks (0: end only)")
    parser.add_argument("--configs", default=None, help="comma list (default: the round's list)")
    parser.add_argument("--generate-tokens", type=int, default=262_144, help="round 1's teacher_text_mix row")
    parser.add_argument("--piqa-limit", type=int, default=-1,
                        help="PIQA items scored per configuration (lm-eval piqa_local; -1 = all 1838, 0 = skip)")
    parser.add_argument("--eval-blocks", type=int, default=0, help="score only the first N test blocks (smoke runs)")
    parser.add_argument("--deadline", type=float, help="Unix time by which the call must be done: later rows are skipped")
    parser.add_argument("--row-overhead", type=float, default=20.0,
                        help="seconds a row needs beyond its training budget, until a row has been measured")
    parser.add_argument("--mix-tokens", type=int, default=4 * 1024 * 512, help="fresh teacher text for data.teacher_mix")
    parser.add_argument("--mix-seconds", type=float, default=60, help="most seconds spent sampling it")
    parser.add_argument("--mix-batch-size", type=int, default=1024)
    parser.add_argument("--mix-seed", type=int, default=1000)
    parser.add_argument("--reuse-mix", action="store_true",
                        help="take the teacher text that an earlier call left in --work instead of sampling it again")
    parser.add_argument("--piqa-seconds", type=float, default=22, help="estimate of one PIQA scoring, for the deadline")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--throughput-settings", default="eager,compiled_quantizers",
                        help=f"comma list of sampling,{','.join(STEP_SETTINGS)}")
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--sampling-batch", type=int, default=1024)
    parser.add_argument("--sampling-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--report-name", help="file stem of the report (default: qat_ablations or qat_round2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qat-ablations"))
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test with a tiny model")
    parser.add_argument("--previous", type=Path, help="report of an earlier call (same model and data): "
                        "its rows join this call's table and the choice of the winner")
    parser.add_argument("--winner-sets", type=Path, help="write the best configuration as `--set key=value` lines")
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of this report json")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(f"# {title(report)}\n\n" + table(report))
        print(table(report))
        return
    run(args)


def run(args) -> None:
    started_at = time.time()
    args.reference, args.ablations, default_configs, default_name = round_settings(args.round)
    args.report_name = args.report_name or default_name
    configs = default_configs if args.configs is None else [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in args.ablations]
    if unknown:
        sys.exit(f"unknown configurations {unknown}; round {args.round} has {list(args.ablations)}")
    settings = [s for s in args.throughput_settings.split(",") if s] if args.throughput else []
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.mix_files = {}
    if any(PIQA_HALF in args.ablations[name].get("data", {}) for name in args.ablations):
        split_piqa(args)  # every row of such a round is scored on each half, so that its rows compare
    from accelerate import Accelerator

    on_gpu = args.device == "cuda"
    device = torch.device(args.device)

    def accelerator_factory():
        return Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu)

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    original, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    args.num_layers = original.config.num_hidden_layers
    teacher = copy.deepcopy(original).to(device=args.device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    timings["load_seconds"] = round(time.perf_counter() - clock, 1)
    import transformers

    report = {"round": args.round, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "model": str(args.model), "seconds_per_config": args.seconds, "steps_per_config": args.steps,
              "piqa_limit": args.piqa_limit,
              "sequence_length": args.sequence_length, "reference": args.reference, "original_ppl": None,
              "original_piqa": None, "eval_blocks": None, "configs": [], "throughput": [], "timings": timings,
              "deadline": args.deadline, "started_at": started_at}
    if configs:  # the original's scores: the yardstick of every row
        clock = time.perf_counter()
        held_out = DataConfig(train=[DataSource(path=str(args.data / "valid.txt"))],
                              eval=DataSource(path=str(args.data / "test.txt")), sequence_length=args.sequence_length)
        eval_blocks = build_training_data(held_out, tokenizer, seed=0, cache_dir=args.work / "data").eval_blocks
        eval_blocks = eval_blocks[: args.eval_blocks] if args.eval_blocks else eval_blocks
        report["eval_blocks"] = len(eval_blocks)
        report["original_ppl"] = math.exp(held_out_loss(teacher, eval_blocks, 32, accelerator_factory()))
        print(f"original perplexity on WikiText-2 test ({len(eval_blocks)} blocks of {args.sequence_length}): "
              f"{report['original_ppl']:.2f}", flush=True)
        scores = piqa_scores(teacher, tokenizer, args)
        report["original_piqa"] = scores.pop("piqa_acc")
        report.update({f"original_{key}": value for key, value in scores.items()})  # the halves, an error
        if report["original_piqa"] is not None:
            print(f"original PIQA acc ({args.piqa_limit if args.piqa_limit > 0 else 'all'} items): "
                  f"{report['original_piqa']:.4f}{halves_text(report, 'original_')}", flush=True)
        timings["original_scores_seconds"] = round(time.perf_counter() - clock, 1)
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        if report["original_ppl"] and abs(earlier["original_ppl"] - report["original_ppl"]) > 1e-3 * report["original_ppl"]:
            sys.exit(f"--previous {args.previous} scored the original at {earlier['original_ppl']:.3f}, this call at "
                     f"{report['original_ppl']:.3f}: not the same model or data")
        report["configs"] = earlier_rows(earlier["configs"], configs)
        report["throughput"] = earlier.get("throughput") or []
        report["original_piqa"] = report["original_piqa"] if report["original_piqa"] is not None else earlier.get("original_piqa")
    save(report, args)

    for setting in settings:
        clock = time.perf_counter()
        if setting == "sampling":
            try:  # each sampler records its own failure; this catches the set-up (prompts) only
                report["throughput"] += sampling_throughput(teacher, tokenizer, args, device)
            except Exception as err:
                report["throughput"].append({"setting": "sampling", "error": error_text(err)})
                print(f"  sampling failed: {report['throughput'][-1]['error']}", flush=True)
        elif setting in STEP_SETTINGS:
            # Written before it runs: a measurement that a time limit kills still shows up.
            report["throughput"].append({"setting": setting, "error": "did not finish (killed by a time limit?)"})
            save(report, args)
            try:
                row = step_throughput(setting, args, original, teacher, tokenizer, accelerator_factory)
                print(f"  {setting:34s} {row['tokens_per_second']:>10,.0f} tok/s  peak {row['peak_gib']:.1f} GiB  "
                      f"first step {row['first_step_seconds']:.1f} s", flush=True)
            except Exception as err:
                row = {"setting": setting, "error": error_text(err)}
                print(f"  {setting:34s} failed: {row['error'][:300]}", flush=True)
            report["throughput"][-1] = row
        else:
            report["throughput"].append({"setting": setting, "error": f"unknown setting; known: sampling, {STEP_SETTINGS}"})
        timings[f"throughput_{setting}_seconds"] = round(time.perf_counter() - clock, 1)
        save(report, args)

    for kind in MIX_KINDS:
        if not any(args.ablations[c].get("data", {}).get(kind) for c in configs):
            continue
        clock = time.perf_counter()
        kept = args.work / f"{kind}.jsonl"
        if args.reuse_mix and kept.is_file() and kept.stat().st_size:
            args.mix_files[kind] = kept
            texts = sum(1 for _ in kept.open())
            report[kind] = {"reused": str(kept), "texts": texts}
            print(f"fresh teacher text ({MIX_KINDS[kind]}): {texts:,} texts of an earlier call, {kept}", flush=True)
            continue
        try:
            report[kind] = sample_teacher_mix(teacher, tokenizer, args, device, args.deadline, kind)
            mix = report[kind]
            print(f"fresh teacher text ({MIX_KINDS[kind]}): {mix['tokens_sampled']:,} tokens in {mix['seconds']} s "
                  f"({mix['tokens_per_second'] or 0:,.0f} tokens/s, {mix['batches']} of {mix['batches_wanted']} batches)",
                  flush=True)
        except Exception as err:
            report[kind] = {"error": error_text(err)}
            print(f"fresh teacher text ({kind}) failed: {report[kind]['error']}", flush=True)
        timings[f"{kind}_seconds"] = round(time.perf_counter() - clock, 1)
        save(report, args)

    overheads: list[float] = []  # seconds each finished row took beyond its training budget
    for name in configs:
        # the recent rows' overhead, plus a margin: the first row also pays one-off kernel compiles
        overhead = statistics.median(overheads[-3:]) + 3 if overheads else args.row_overhead
        needs = row_seconds(name, args) + overhead
        if args.deadline is not None:
            left = args.deadline - time.time()
            if left < needs:
                report["configs"].append({"name": name, "change": args.ablations[name],
                                          "skipped": f"deadline: needs ~{needs:.0f} s, {left:.0f} s left"})
                print(f"  {name:18s} skipped ({report['configs'][-1]['skipped']})", flush=True)
                save(report, args)
                continue
        try:
            row = run_config(name, args, original, teacher, tokenizer, accelerator_factory)
            overheads.append(row["wall_seconds"] - row_seconds(name, args))
            print(f"  {name:18s} steps {row['steps']:>5d}  tokens {row['tokens']:>10,d}  "
                  f"{row['tokens_per_second'] or 0:>9,.0f} tok/s  ppl {row['final_ppl']:.2f} "
                  f"({row['final_ppl'] / report['original_ppl']:.2f}x)  piqa {fmt(row.get('piqa_acc'))}"
                  f"{halves_text(row)}  "
                  f"wall {row['wall_seconds']:.0f} s", flush=True)
        except Exception as err:  # one broken configuration must not cost the others
            row = {"name": name, "change": args.ablations[name], "error": error_text(err)}
            print(f"  {name:18s} failed: {row['error']}", flush=True)
            free_memory()
        report["configs"].append(row)
        save(report, args)
    timings["total_seconds"] = round(time.time() - started_at, 1)
    save(report, args)
    print("\n" + table(report))
    best = winner(report)
    if args.winner_sets and best:
        # a settable row has the reference's data, which the recipe already holds: only its other keys are set
        settable = {k: v for k, v in best["change"].items() if k not in ("data", "same_tokens")}
        lines = [f"--set {key}={value}" for key, value in flatten(settable).items()]
        args.winner_sets.write_text(" ".join(lines) + "\n")
        print(f"winner: {best['name']} -> {' '.join(lines) or '(the reference)'}")


def earlier_rows(rows: list[dict], configs: list[str]) -> list[dict]:
    """An earlier call's rows (--previous) that join this call's: all but its skips and failures of a row this call
    runs again, which that row's result replaces."""
    return [row for row in rows if row.get("final_ppl") is not None or row["name"] not in configs]


def measured_rows(report: dict) -> list[dict]:
    return [row for row in report["configs"] if row.get("final_ppl") is not None]


def winner(report: dict) -> dict:
    """Only configurations that keep every linear ternary and that `--set` can express may become
    the default (a teacher-text mix changes the data list; it is reported, not applied)."""
    rows = measured_rows(report)
    # round-1 reports have no flags: their two exceptions by name
    eligible = [row for row in rows if row.get("all_ternary", row["name"] != "keep_edge_blocks")
                and row.get("settable", row["name"] != "teacher_text_mix")]
    return min(eligible, key=lambda row: row["final_ppl"]) if eligible else None


def title(report: dict) -> str:
    if report.get("original_ppl") is None and report.get("throughput"):
        return "QAT step and teacher sampling throughput"
    return f"QAT ablations, round {report['round']}" if report.get("round", 1) > 1 else "QAT ablations"


def table(report: dict) -> str:
    """The markdown table of a report, ordered by perplexity, the original first; then the rows that
    failed or were skipped, the fresh teacher text and the throughput measurements."""
    original = report.get("original_ppl")
    blocks = report.get("eval_blocks")
    limit = report.get("piqa_limit", -1)
    rows = measured_rows(report)
    if original is None:
        lines = [f"On {report['device']} (torch {report.get('torch')}, transformers {report.get('transformers')}), "
                 f"model {report.get('model', 'SmolLM2-135M')}.", ""]
    else:
        budget = (f"{report['steps_per_config']} steps" if report.get("steps_per_config")
                  else f"{report['seconds_per_config']:g} s")
        lines = [f"SmolLM2-135M, {budget} of distillation per configuration on {report['device']}; "
                 f"WikiText-2 test perplexity over {blocks} blocks of {report.get('sequence_length', 512)} tokens; "
                 f"PIQA: lm-eval piqa_local, {'all' if limit < 0 else 'first ' + str(limit)} items.", ""]
        if report.get("steps_per_config") and any(row.get("steps") != report["steps_per_config"] for row in rows):
            lines[-1:-1] = ["A row with `steps_factor` trains that many times the steps (its steps column)."]

        # a round that splits PIQA (split_piqa) shows each half beside the whole
        halves = ("a", "b") if report.get("original_piqa_b") is not None or any("piqa_b" in r for r in rows) else ()
        lines += ["| config | change | all ternary | steps | tokens | tok/s | ppl | x original | PIQA acc |"
                  + "".join(f" PIQA {half} |" for half in halves),
                  "| --- | --- | :---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(halves),
                  f"| original | | | | | | {original:.2f} | 1.000 | {fmt(report.get('original_piqa'))} |"
                  + "".join(f" {fmt(report.get(f'original_piqa_{half}'))} |" for half in halves)]
        for row in sorted(rows, key=lambda row: row["final_ppl"]):
            ternary = row.get("all_ternary", row["name"] != "keep_edge_blocks")
            lines.append(f"| {row['name']} | `{json.dumps(rounded(row['change']))}` | {'yes' if ternary else '**no**'} | "
                         f"{row['steps']} | {row['tokens']:,} | {speed(row)} | "
                         f"{row['final_ppl']:.2f} | {row['final_ppl'] / original:.3f} | {fmt(row.get('piqa_acc'))} |"
                         + "".join(f" {fmt(row.get(f'piqa_{half}'))} |" for half in halves))
    for row in rows:
        if row.get("piqa_curve"):
            points = ", ".join(f"{acc:.3f} at {tokens / 1e6:.2f}M" for tokens, acc in row["piqa_curve"])
            lines += ["", f"PIQA along {row['name']} (acc at training tokens): {points}."]
    if rows and winner(report):
        lines += ["", f"Winner (all-ternary, expressible with `--set`): **{winner(report)['name']}**."]
    for row in report["configs"]:
        if row.get("final_ppl") is None:
            lines.append(f"- {row['name']}: {'skipped, ' + row['skipped'] if 'skipped' in row else 'failed: ' + str(row.get('error'))}")
    for kind, what in MIX_KINDS.items():
        mix = report.get(kind)
        if mix:
            if "error" in mix:
                told = f"failed: {mix['error']}"
            elif "reused" in mix:
                told = f"{mix['texts']:,} texts sampled by an earlier call, reused"
            else:
                told = (f"{mix['tokens_sampled']:,} tokens ({mix['texts']:,} texts) in {mix['seconds']} s, "
                        f"{mix['tokens_per_second'] or 0:,.0f} tokens/s")
            lines += ["", f"Fresh teacher text, {kind} ({what}; sampled once, not part of any row's budget): {told}."]
    if report.get("throughput"):
        lines += ["", "| throughput | tokens/s | peak GiB | notes |", "| --- | ---: | ---: | --- |"]
        for row in report["throughput"]:
            notes = row.get("error") or ", ".join(f"{k} {v}" for k, v in row.items() if k in (
                "batch", "new_tokens", "used_cuda_graph", "teacher_nll", "mean_tokens_before_eos", "first_step_seconds",
                "warm_up_seconds", "sequence_length"))
            lines.append(f"| {row['setting']} | {speed(row)} | {row.get('peak_gib', '—')} | {notes} |")
    if report.get("timings"):
        lines += ["", "Timings (s): " + ", ".join(f"{k.removesuffix('_seconds')} {v}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


def save(report: dict, args) -> None:
    for path, text in ((args.out / f"{args.report_name}.json", json.dumps(report, indent=2)),
                       (args.out / f"{args.report_name}.md", f"# {title(report)}\n\n" + table(report))):
        atomic_write_text(path, text)
        path.chmod(0o644)  # atomic writes start private; these are results to hand around


def rounded(change):
    """A configuration's change for the table: shares such as 2/3 and rates such as 3e-4 in three significant digits."""
    if isinstance(change, dict):
        return {k: rounded(v) for k, v in change.items()}
    return float(f"{change:.3g}") if isinstance(change, float) else change


def halves_text(scores: dict, prefix: str = "") -> str:
    """' (a 0.650, b 0.644)' where PIQA was scored by halves (split_piqa), else nothing."""
    if scores.get(f"{prefix}piqa_b") is None:
        return ""
    return f" (a {fmt(scores.get(f'{prefix}piqa_a'))}, b {fmt(scores.get(f'{prefix}piqa_b'))})"


def speed(row: dict) -> str:
    return f"{row['tokens_per_second']:,.0f}" if row.get("tokens_per_second") else "—"


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def flatten(change: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"loss": {"ce": 0}}} -> {"train.loss.ce": "0"} with values as YAML (lists as flow)."""
    out = {}
    for key, value in change.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


if __name__ == "__main__":
    main()
