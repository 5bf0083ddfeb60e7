"""``bitconvert eval``: score a ternary export and its original side by side with lm-evaluation-harness.

Both models are loaded with :func:`bitconvert.sources.load_model` and handed to the harness's own HF
wrapper (``HFLM(pretrained=model, tokenizer=tokenizer)``); tasks run through its
``simple_evaluate``. Nothing of the harness is re-implemented: bitconvert only adds task YAMLs that
read local files (``*_local``, see :mod:`bitconvert.eval.data`) and a perplexity mode on text files
that calls the harness's rolling log-likelihood.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import gc
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitconvert.eval.cache import BaselineCache, cache_key, file_identity, model_identity, software_versions
from bitconvert.eval.data import LOCAL_TASKS, TASKS_DIR, resolve_data_dir, task_files
from bitconvert.eval.errors import EvalError
from bitconvert.eval.perplexity import PERPLEXITY_METRICS, rolling_perplexity
from bitconvert.eval.report import EvalReport, EvalRow
from bitconvert.utils.io import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 1000  # stderr of means is closed-form; this only bounds bootstrapped metrics
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RESULT_SECTIONS = ("results", "n-samples", "higher_is_better", "versions", "n-shot")


@dataclass
class _Unit:
    """One thing scored and cached as a whole: a requested task (or group) name, or a text file."""

    name: str
    key: dict[str, Any]
    items: list = field(default_factory=list)  # harness Task/Group objects to run
    members: set[str] = field(default_factory=set)  # names under which the harness reports them
    path: Path | None = None  # text file, for perplexity units

    @property
    def is_file(self) -> bool:
        return self.path is not None


# --------------------------------------------------------------------------- argument checks

def parse_task_names(tasks: str | Iterable[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    if tasks is None:
        return []
    parts = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for part in parts for n in str(part).split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 on GPUs (the models were trained or distilled in it); CPUs are faster and exact in fp32.
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvalError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _recorded_source(model_dir: Path) -> str:
    from bitconvert.export.packed import MANIFEST

    try:
        source = json.loads((model_dir / MANIFEST).read_text()).get("provenance", {}).get("source")
    except (OSError, json.JSONDecodeError):
        source = None
    if not source:
        raise EvalError(f"{model_dir} records no source model; name the original with --baseline MODEL")
    return source


def _task_data_paths(task_data: Mapping[str, str | os.PathLike] | None) -> dict[str, str]:
    paths = {}
    for name, path in (task_data or {}).items():
        if name not in LOCAL_TASKS:
            twin = f"{name}_local"
            close = [twin] if twin in LOCAL_TASKS else difflib.get_close_matches(name, list(LOCAL_TASKS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EvalError(f"--task-data names {name!r}, which is not a local task ({', '.join(LOCAL_TASKS)}){hint}")
        paths[name] = str(Path(path).expanduser().resolve())
    return paths


# --------------------------------------------------------------------------- harness tasks

class _QuietHarness(logging.Filter):
    """Drops harness warnings about things bitconvert does on purpose: it passes custom_dataset
    kwargs itself (through TaskManager metadata) and hands HFLM an already-loaded model."""

    EXPECTED = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type",
                "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.EXPECTED)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lm_eval.api.task", "lm_eval.models.huggingface")]
    quiet = _QuietHarness()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _task_manager(names: list[str], data_dir: Path | None, data_paths: dict[str, str]):
    """The harness's task manager for ``names``, after checking that every local task has its files and that
    every name is a task the harness knows."""
    from lm_eval.tasks import TaskManager

    for name in names:
        if name in LOCAL_TASKS:
            task_files(name, data_dir, data_paths)
    # Indexing the harness's ~15k YAML files takes seconds; skip it when only local tasks are asked for.
    needs_hub = any(n not in LOCAL_TASKS for n in names)
    metadata = {"data_dir": str(data_dir) if data_dir else None, "data_paths": data_paths}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_hub, metadata=metadata)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | set(LOCAL_TASKS)), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists the harness's tasks"
            raise EvalError(f"unknown task {name!r}{hint}")
    return manager


def _load_task(manager, name: str) -> tuple[list, set[str]]:
    """The harness objects for one requested name, and every name its results appear under."""
    try:
        with _quiet_harness():
            loaded = manager.load([name])
    except EvalError:
        raise
    except Exception as err:  # the harness surfaces dataset problems as many exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        twin = f"{name}_local"
        hint = (f"; offline, use bitconvert's {twin} with --data-dir (docs/evaluation.md)" if twin in LOCAL_TASKS
                else "; it may need the network or files the harness cannot find")
        raise EvalError(f"task {name!r} could not load its data ({type(err).__name__}: {first}){hint}") from err
    groups, tasks = loaded.get("groups", {}), loaded["tasks"]
    items = [groups[name]] if name in groups else list(tasks.values())
    return items, set(tasks) | set(groups)


def _task_identity(name: str, data_dir: Path | None, data_paths: dict[str, str]) -> dict[str, Any]:
    if name not in LOCAL_TASKS:
        # Hub tasks: the harness version (in every key) pins the YAML; the dataset is the hub's.
        return {"task": name}
    return {"task": name, "yaml_sha256": sha256_file(LOCAL_TASKS[name].yaml_path()),
            "data": [file_identity(p) for p in task_files(name, data_dir, data_paths)]}


# --------------------------------------------------------------------------- scoring

def _split_results(results: dict[str, Any], members: set[str]) -> dict[str, Any]:
    return {section: {k: v for k, v in results.get(section, {}).items() if k in members}
            for section in _RESULT_SECTIONS}


def _harness_model(model, tokenizer, batch_size: int, max_length: int | None = None):
    """The harness's HF wrapper around a model already loaded."""
    from lm_eval.models.huggingface import HFLM

    # Log-softmax in fp32 even for a bf16 model: perplexities need more than bf16's 8 mantissa bits.
    with _quiet_harness():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                    softmax_dtype=torch.float32)


def _score_model(spec: str | Path, units: list[_Unit], *, role: str, manager, limit: int | None, batch_size: int,
                 device: str, dtype: torch.dtype, max_length: int | None) -> dict[str, dict[str, Any]]:
    """Load one model, run every unit on it, free it. Returns unit name -> JSON-ready result."""
    from lm_eval.evaluator import simple_evaluate

    from bitconvert.sources import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    lm = _harness_model(model, tokenizer, batch_size, max_length)
    out: dict[str, dict[str, Any]] = {}
    try:
        task_units = [u for u in units if not u.is_file]
        if task_units:
            names = ", ".join(u.name for u in task_units)
            log.info("%s model: running %s (limit %s)", role, names, limit or "none")
            with _quiet_harness():
                results = simple_evaluate(model=lm, tasks=[i for u in task_units for i in u.items], limit=limit,
                                          bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, task_manager=manager)
            for unit in task_units:
                out[unit.name] = json.loads(json.dumps(_split_results(results, unit.members), default=str))
        for unit in (u for u in units if u.is_file):
            log.info("%s model: perplexity of %s", role, unit.path)
            out[unit.name] = rolling_perplexity(lm, unit.path, max_windows=limit)
    finally:
        del lm, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


class TaskTracker:
    """Scores a model in memory on harness tasks, as often as asked: a task's curve during training.

    The tasks are loaded once, here, so that a bad name or a missing file fails before training starts.
    Each call wraps the model as it is (no copy, no dtype or device change) and returns
    ``{"<task>/<metric>": value}``; it leaves the model in eval mode, as the harness does.
    """

    def __init__(self, tasks: str | Iterable[str], tokenizer, *, limit: int | None = None, batch_size: int = 8,
                 data_dir: str | os.PathLike | None = None):
        names = parse_task_names(tasks)
        if not names:
            raise EvalError("nothing to track: give at least one task")
        self.manager = _task_manager(names, resolve_data_dir(data_dir), {})
        self.items = [item for name in names for item in _load_task(self.manager, name)[0]]
        self.tokenizer, self.limit, self.batch_size = tokenizer, limit, batch_size

    def __call__(self, model) -> dict[str, float]:
        from lm_eval.evaluator import simple_evaluate

        lm = _harness_model(model, self.tokenizer, self.batch_size)
        with _quiet_harness():
            # bootstrap_iters=0: no standard errors, only the values that a curve plots
            results = simple_evaluate(model=lm, tasks=self.items, limit=self.limit, bootstrap_iters=0,
                                      log_samples=False, task_manager=self.manager)
        rows = _metric_rows(_Unit("tracked", {}), results)
        return {f"{task}/{metric}": row["value"] for (task, metric), row in rows.items() if row["value"] is not None}


# --------------------------------------------------------------------------- report

def _as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric_rows(unit: _Unit, result: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, metric) -> {value, stderr, higher_is_better, n}, in the harness's order."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if result is None:
        return rows
    if unit.is_file:
        for metric, higher in PERPLEXITY_METRICS.items():
            rows[(unit.name, metric)] = {"value": result[metric], "stderr": None, "higher_is_better": higher,
                                         "n": result["tokens"]}
        return rows
    for task, metrics in result["results"].items():
        better = result["higher_is_better"].get(task, {})
        n = result["n-samples"].get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or key.split(",", 1)[0].endswith("_stderr"):
                continue
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric} [{filt}]"
            stderr = _as_float(metrics.get(f"{metric}_stderr,{filt}"))
            rows[(task, label)] = {"value": _as_float(value), "stderr": stderr, "higher_is_better": better.get(metric),
                                   "n": n}
    return rows


def _build_rows(units: list[_Unit], ternary: dict[str, Any], original: dict[str, Any]) -> list[EvalRow]:
    rows = []
    for unit in units:
        new, old = _metric_rows(unit, ternary.get(unit.name)), _metric_rows(unit, original.get(unit.name))
        for (task, metric) in list(new) + [k for k in old if k not in new]:
            a, b = old.get((task, metric), {}), new.get((task, metric), {})
            rows.append(EvalRow(task=task, metric=metric, original=a.get("value"), ternary=b.get("value"),
                                higher_is_better=b.get("higher_is_better", a.get("higher_is_better")),
                                n=b.get("n", a.get("n")), original_stderr=a.get("stderr"),
                                ternary_stderr=b.get("stderr")))
    return rows


def _notes(names: list[str], files: list[Path], units: list[_Unit], ternary: dict, original: dict,
           limit: int | None) -> list[str]:
    notes = []
    if limit is not None:
        per_file = f", first {limit} windows per text file" if files else ""
        notes.append(f"limit {limit}: first {limit} items per task{per_file} — not full-benchmark numbers")
    local = [n for n in names if n in LOCAL_TASKS]
    if local:
        notes.append(f"{', '.join(local)}: the harness's own task definitions reading local files (docs/evaluation.md)")
    if "wikitext_local" in names:
        notes.append("wikitext_local scores the tokenized WikiText-2 release (rare words as <unk>): compare its "
                     "perplexities between these two models, not with published `wikitext` numbers")
    for unit in (u for u in units if u.is_file):
        a, b = original.get(unit.name, {}), ternary.get(unit.name, {})
        if a and b and a.get("tokenizer") != b.get("tokenizer"):
            notes.append(f"{unit.name}: the two models use different tokenizers; compare bits_per_byte, "
                         "not token_perplexity")
    return notes


def _card_section(report: EvalReport, harness_version: str, command: str) -> str:
    lines = ["## Evaluation", "",
             f"Zero-shot scores from lm-evaluation-harness {harness_version}: this model (**ternary**) next to "
             f"`{report.baseline}` (**original**), {report.settings['created'][:10]}, on {report.settings['device']} "
             f"in {report.settings['dtype']}. Full results: `eval/results.json`.", "",
             report.markdown(), ""]
    lines += [f"- {note}" for note in report.notes]
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def _command_line(model_dir: Path, baseline: str, names: list[str], files: list[Path], limit: int | None,
                  data_dir: Path | None) -> str:
    parts = ["bitconvert eval", str(model_dir), "--baseline", baseline]
    if names:
        parts += ["--tasks", ",".join(names)]
    for file in files:
        parts += ["--perplexity", str(file)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    return " ".join(parts)


# --------------------------------------------------------------------------- entry point

def evaluate(model_dir: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
             tasks: str | Iterable[str] | None = (), perplexity_files: Iterable[str | os.PathLike] | None = (),
             limit: int | None = None, batch_size: int = 8, device: str | None = None,
             data_dir: str | os.PathLike | None = None, task_data: Mapping[str, str | os.PathLike] | None = None,
             dtype: str | torch.dtype | None = None, max_length: int | None = None,
             use_cache: bool = True, cache: BaselineCache | None = None) -> EvalReport:
    """Score ``model_dir`` and ``baseline`` on harness tasks and text files; write results and the card.

    ``tasks``: harness task names (hub-backed) or bitconvert's local tasks (``piqa_local``,
    ``wikitext_local``, ``arc_easy_local``, ``arc_challenge_local``, ``hellaswag_local``), which
    read files under ``data_dir`` (default ``$BITCONVERT_DATA``) or the per-task paths in
    ``task_data``. ``perplexity_files``: text files scored by rolling perplexity. ``limit``: first
    N items per task, first N windows of ``max_length`` tokens per file. ``baseline`` defaults to
    the source recorded in the export. The baseline's scores are cached (``use_cache``).

    Results go to ``<model_dir>/eval/results.json``; the evaluation section of
    ``<model_dir>/README.md`` is replaced by the table.
    """
    from bitconvert.api import default_device
    from bitconvert.export.card import update_card_section

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EvalError(f"{model_dir} is not a folder; give the export folder to evaluate")
    names = parse_task_names(tasks)
    files = [Path(p).expanduser().resolve() for p in (perplexity_files or ())]
    for file in files:
        if not file.is_file():
            raise EvalError(f"perplexity file {file} does not exist")
    if not names and not files:
        raise EvalError("nothing to evaluate: give --tasks and/or --perplexity FILE")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit must be a positive whole number, got {limit!r}")
    if batch_size < 1:
        raise EvalError(f"batch size must be positive, got {batch_size}")
    baseline = str(baseline) if baseline is not None else _recorded_source(model_dir)
    device = default_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    data_paths = _task_data_paths(task_data)
    data_root = resolve_data_dir(data_dir)

    # Everything that can fail on user input fails here, before a model is loaded.
    baseline_identity = model_identity(baseline)
    manager = _task_manager(names, data_root, data_paths) if names else None
    settings = {"limit": limit, "batch_size": batch_size, "max_length": max_length, "dtype": dtype_name,
                "device_type": torch.device(device).type, "bootstrap_iters": BOOTSTRAP_ITERS}
    units = []
    for name in names:
        items, members = _load_task(manager, name)
        units.append(_Unit(name, cache_key(model=baseline_identity, unit=_task_identity(name, data_root, data_paths),
                                           **settings), items, members))
    for file in files:
        unit_name = f"perplexity:{file.name}"
        units.append(_Unit(unit_name, cache_key(model=baseline_identity, unit={"perplexity": file_identity(file)},
                                                **settings), path=file))
    if len({u.name for u in units}) != len(units):
        raise EvalError("two perplexity files share a file name; rename one so that their rows can be told apart")

    cache = cache or BaselineCache()
    original: dict[str, dict[str, Any]] = {}
    if use_cache:
        for unit in units:
            if (hit := cache.get(unit.key)) is not None:
                original[unit.name] = hit
    common = dict(manager=manager, limit=limit, batch_size=batch_size, device=device, dtype=torch_dtype,
                  max_length=max_length)
    ternary = _score_model(model_dir, units, role="ternary", **common)
    missing = [u for u in units if u.name not in original]
    cached_names = [u.name for u in units if u.name in original]
    if missing:
        fresh = _score_model(baseline, missing, role="original", **common)
        for unit in missing:
            cache.put(unit.key, fresh[unit.name])
        original.update(fresh)

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report = EvalReport(
        model_dir=model_dir, baseline=baseline, rows=_build_rows(units, ternary, original),
        settings={**settings, "device": device, "created": created, "tasks": names,
                  "perplexity_files": [str(f) for f in files], "data_dir": str(data_root) if data_root else None,
                  "task_data": data_paths},
        baseline_cached=cached_names,
        notes=_notes(names, files, units, ternary, original, limit))
    for row in report.rows:
        if row.original is None or row.ternary is None:
            log.warning("%s %s: only one of the two models reported it", row.task, row.metric)

    versions = software_versions()
    out_dir = model_dir / "eval"
    payload = {**report.to_dict(), "software": versions, "baseline_identity": baseline_identity,
               "ternary": ternary, "original": original}
    stamp = created.replace(":", "").replace("-", "").replace("+0000", "Z")
    atomic_write_json(out_dir / f"results-{stamp}.json", payload)
    atomic_write_json(out_dir / "results.json", payload)
    atomic_write_text(out_dir / "table.md", report.markdown() + "\n")
    report.results_path = out_dir / "results.json"
    update_card_section(model_dir, _card_section(report, versions["lm_eval"],
                                                 _command_line(model_dir, baseline, names, files, limit, data_root)))
    return report
