"""The ``bitconvert`` command line: parse, validate, call the library, print."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import click

from bitconvert.utils.io import DiskFullError

log = logging.getLogger("bitconvert")


def _user_errors() -> tuple[type[BaseException], ...]:
    from bitconvert.convert import UnsupportedModuleError
    from bitconvert.export.packed import ExportError
    from bitconvert.recipes.loading import RecipeError
    from bitconvert.sources import ModelSourceError
    from bitconvert.train.data import DataError
    from bitconvert.train.finetune import FinetuneDataError
    from bitconvert.train.loop import ResumeError

    errors = [ModelSourceError, RecipeError, UnsupportedModuleError, DataError, ExportError, ResumeError, DiskFullError,
              FinetuneDataError]
    try:
        from bitconvert.eval import EvalError

        errors.append(EvalError)
    except ImportError:
        pass
    return tuple(errors)


class BitconvertGroup(click.Group):
    """Turns the library's user-facing errors into one clear line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as err:
            click.secho(f"error: {err}", fg="red", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            # A Ctrl-C outside the training loop's own handler (a second one, or one in the export or the
            # evaluation): every file is written atomically, so the way on is the last checkpoint.
            click.secho("aborted (Ctrl-C): no file is left half-written. quantize and run continue from their last "
                        "checkpoint with --resume; when the training budget is already spent, that only exports.",
                        fg="yellow", err=True)
            ctx.exit(130)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                click.secho(f"error: disk full: {err}", fg="red", err=True)
                ctx.exit(2)
            raise


@click.group(cls=BitconvertGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Turn a Hugging Face causal LM into a BitNet b1.58 model (ternary weights, int8 activations)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if level > logging.DEBUG:
        for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3", "lm_eval"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _report(result) -> None:
    if not result.is_main_process:
        return
    if result.interrupted:
        click.echo(f"stopped at step {result.train.steps}; checkpoint saved in {result.train.checkpoint}. "
                   "Continue with the same command and --resume.")
        return
    click.echo(f"{result.report.summary()}")
    if result.train:
        click.echo(f"trained {result.train.steps} steps, {result.train.tokens:,} tokens in {result.train.seconds:.0f} s")
    for name, path in result.exports.items():
        click.echo(f"exported {name}: {path}")
    if result.evaluation is not None:
        click.echo(result.evaluation.table())


@main.command()
@click.argument("model")
@click.option("--out", "output", required=True, type=click.Path(file_okay=False), help="Export folder.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), help="Start from this recipe YAML.")
@click.option("--mode", type=click.Choice(["distill", "pretrain", "none"]), help="Training objective ('none' = no training).")
@click.option("--steps", type=int, help="Training budget in optimizer steps.")
@click.option("--tokens", type=int, help="Training budget in tokens.")
@click.option("--minutes", type=float, help="Training budget in wall-clock minutes.")
@click.option("--data", "data", multiple=True, help="Training text: file, folder or saved dataset (repeatable).")
@click.option("--eval-data", help="Held-out text for perplexity during training.")
@click.option("--seq-len", type=int, help="Tokens per training sequence.")
@click.option("--batch-size", type=int, help="Sequences per device per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--variant", type=click.Choice(["b1.58", "bitnet1", "onebit"]),
              help="Weight quantizer: ternary b1.58 (default), BitNet 1-bit, or OneBit (docs/variants.md).")
@click.option("--weight-scale", type=click.Choice(["tensor", "channel", "group"]),
              help="Weights per scale: one per tensor (loads in plain transformers), per output row (channel, the "
                   "default) or per --group-size inputs.")
@click.option("--mod-capacity", type=float, help="Mixture-of-Depths: route every other block, this share of tokens "
                                                "(e.g. 0.125; more with --set convert.mixture_of_depths.KEY=VALUE).")
@click.option("--group-size", type=int, help="Inputs per scale with --weight-scale group.")
@click.option("--skip", multiple=True, help="Module name/suffix/regex to keep in full precision (repeatable).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["packed", "gguf-tq2_0", "gguf-tq1_0"]),
              help="Export format (repeatable; packed is always written).")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. train.lr=3e-4.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT/training.")
def quantize(model, output, recipe, mode, steps, tokens, minutes, data, eval_data, seq_len, batch_size, grad_accum, lr,
             variant, weight_scale, mod_capacity, group_size, skip, formats, device, overrides, resume):
    """Convert MODEL (embedded name, folder, .gguf file or hub id) to BitNet b1.58 and export it to OUT."""
    import yaml

    from bitconvert.api import quantize as run_quantize
    from bitconvert.recipes.loading import recipe_from_dict

    base = yaml.safe_load(Path(recipe).read_text()) if recipe else {}
    sets = [f"model={model}", f"output={output}"]
    if mode:
        sets.append(f"train.mode={mode}")
    budgets = {"steps": steps, "tokens": tokens, "minutes": minutes}
    if any(v is not None for v in budgets.values()):
        sets += [f"train.{k}={'null' if v is None else v}" for k, v in budgets.items()]
    for key, value in {"data.sequence_length": seq_len, "train.batch_size": batch_size,
                       "train.grad_accum": grad_accum, "train.lr": lr, "convert.variant": variant,
                       "convert.weight_scale": weight_scale, "convert.mixture_of_depths.capacity": mod_capacity,
                       "convert.group_size": group_size, "device": device}.items():
        if value is not None:
            sets.append(f"{key}={value}")
    if data:
        base.setdefault("data", {})["train"] = [{"path": p} for p in data]
    if eval_data:
        base.setdefault("data", {})["eval"] = {"path": eval_data}
    if skip:
        base.setdefault("convert", {})["skip"] = list(skip)
    if formats:
        base.setdefault("export", {})["formats"] = sorted(set(formats) | {"packed"})
    resolved = recipe_from_dict(base, [*sets, *overrides], source="options")
    _report(run_quantize(resolved, resume=resume))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.lr=3e-4.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint.")
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved recipe; run nothing.")
def run(recipe, overrides, resume, dry_run):
    """Run a recipe YAML: convert, train, export and evaluate as it says."""
    from bitconvert.api import quantize as run_quantize
    from bitconvert.recipes.loading import dump_recipe, load_recipe

    resolved = load_recipe(recipe, list(overrides))
    if dry_run:
        click.echo(dump_recipe(resolved), nl=False)
        return
    _report(run_quantize(resolved, resume=resume))


@main.command()
@click.argument("model_dir")
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--device", help="cpu, cuda ... (default: cuda if available).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="LoRA folder from `bitconvert finetune`.")
def generate(model_dir, prompt, max_new_tokens, temperature, chat, device, adapter):
    """Generate text from MODEL_DIR (a ternary export, or any model) after PROMPT."""
    from bitconvert.api import generate as run_generate

    click.echo(prompt, nl=False)
    run_generate(model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                 device=device, on_text=lambda text: click.echo(text, nl=False), adapter=adapter)
    click.echo()


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL rows: {prompt, response}, {messages: [...]} or {text}.")
@click.option("--out", "output", required=True, type=click.Path(file_okay=False), help="Adapter folder to write.")
@click.option("--epochs", type=float, help="Passes over the data (default 3).")
@click.option("--steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, help="Peak learning rate (default 2e-4).")
@click.option("--rank", type=int, help="LoRA rank (default 16).")
@click.option("--alpha", type=float, help="LoRA alpha (default 32).")
@click.option("--dropout", type=float, help="LoRA dropout (default 0.05).")
@click.option("--batch-size", type=int, help="Examples per micro-batch (default 4).")
@click.option("--grad-accum", type=int, help="Micro-batches per step (default 1).")
@click.option("--max-length", type=int, help="Tokens per example (default 1024).")
@click.option("--target", "targets", multiple=True, help="Module leaf name to adapt (repeatable; default: all packed linears).")
@click.option("--template", type=click.Choice(["auto", "chat", "plain"]), help="Rendering of prompt/response rows.")
@click.option("--seed", type=int, help="Adapter init and data order (default 0).")
@click.option("--device", help="cpu, cuda ... (default: cuda if available).")
def finetune(model_dir, data, output, epochs, steps, lr, rank, alpha, dropout, batch_size, grad_accum, max_length,
             targets, template, seed, device):
    """Train LoRA adapters on DATA over the frozen packed model in MODEL_DIR; save them (peft format) to OUT."""
    from pydantic import ValidationError

    from bitconvert.train.finetune import FinetuneConfig
    from bitconvert.train.finetune import finetune as run_finetune

    given = {"epochs": epochs, "steps": steps, "lr": lr, "rank": rank, "alpha": alpha, "dropout": dropout,
             "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length,
             "target_modules": list(targets) or None, "template": template, "seed": seed}
    try:
        config = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise click.UsageError(str(err)) from None
    result, _ = run_finetune(model_dir, data, output, config, device=device)
    click.echo(f"trained {result.steps} steps on {result.examples} examples ({result.response_tokens:,} response "
               f"tokens) in {result.seconds:.0f} s; final loss {result.losses[-1]:.4f}")
    click.echo(f"adapter saved to {output}")


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
def inspect(model_dir, no_verify):
    """Show what a ternary export holds and check its files against the manifest."""
    from bitconvert.export.packed import read_manifest

    manifest = read_manifest(model_dir, verify=not no_verify)
    spec = manifest["spec"]
    click.echo(f"{model_dir}: {manifest['format']} v{manifest['format_version']}, created {manifest['created']}")
    click.echo(f"  source: {manifest.get('provenance', {}).get('source', '?')}")
    click.echo(f"  variant {spec['variant']}, weight scales per {spec['weight_scale']}, subln {spec['subln']}")
    click.echo(f"  {len(manifest['modules'])} quantized modules, {manifest['quantized_parameters']:,} quantized weights")
    click.echo(f"  loads in plain transformers: {'yes' if manifest['transformers_compatible'] else 'no (import bitconvert first)'}")
    for name, info in manifest["files"].items():
        click.echo(f"  {name:32s} {info['bytes']:>14,d} bytes  sha256 {info['sha256'][:16]}")
    click.echo("  files verified" if not no_verify else "  files not verified (--no-verify)")


@main.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["gguf-tq2_0", "gguf-tq1_0"]), help="Target format.")
@click.option("--out", "output", type=click.Path(), help="Output file or folder (default: inside MODEL_DIR).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the export's files.")
def export_cmd(model_dir, fmt, output, no_verify):
    """Write an existing ternary export (MODEL_DIR) in another format, e.g. GGUF for llama.cpp."""
    from bitconvert.export.gguf import export_folder_to_gguf

    report = export_folder_to_gguf(model_dir, fmt.removeprefix("gguf-"), output, verify=not no_verify)
    click.echo(f"wrote {report.summary()}")
    for reason, names in report.fallbacks.items():
        click.echo(f"  {len(names)} tensor(s): {reason}")


@main.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--baseline", help="Original model to compare with (default: the source recorded in the export).")
@click.option("--tasks", help="Comma-separated lm-eval tasks, or local ones: piqa_local, wikitext_local, "
                              "arc_easy_local, arc_challenge_local, hellaswag_local.")
@click.option("--perplexity", "perplexity_files", multiple=True, metavar="FILE",
              help="Text file scored by rolling perplexity (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), help="First N items per task / N windows per text file.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="auto = bfloat16 on GPU, float32 on CPU.")
@click.option("--max-length", type=click.IntRange(min=16), help="Context window (default: the model's).")
@click.option("--data-dir", envvar="BITCONVERT_DATA", show_envvar=True,
              help="Folder with local task data, e.g. piqa/valid.jsonl, wikitext-2/test.txt (docs/evaluation.md).")
@click.option("--task-data", multiple=True, metavar="TASK=PATH", help="Data file or folder for one local task (repeatable).")
@click.option("--no-cache", is_flag=True, help="Re-score the baseline instead of reading its cached scores.")
def eval_cmd(model_dir, baseline, tasks, perplexity_files, limit, batch_size, device, dtype, max_length, data_dir,
             task_data, no_cache):
    """Score MODEL_DIR and its original side by side (lm-evaluation-harness) and update its model card."""
    from bitconvert.eval import EvalError, evaluate

    paths = {}
    for item in task_data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--task-data wants TASK=PATH, got {item!r}")
        paths[name.strip()] = path.strip()
    report = evaluate(model_dir, baseline=baseline, tasks=tasks, perplexity_files=perplexity_files, limit=limit,
                      batch_size=batch_size, device=device, data_dir=data_dir, task_data=paths, dtype=dtype,
                      max_length=max_length, use_cache=not no_cache)
    click.echo(report.table())
    click.echo(f"results: {report.results_path}; model card: {Path(model_dir) / 'README.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
