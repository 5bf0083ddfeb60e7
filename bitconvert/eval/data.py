"""Local data for bitconvert's offline tasks: where the files live and how they become harness docs.

Every local task ``<name>_local`` is the harness's own task ``<name>`` (same prompt, choices,
target and metrics; see the YAML files in ``bitconvert/eval/tasks``) with the hub dataset swapped
for files on disk. Files are found, in this order:

1. an explicit path for the task (``data_paths={"piqa_local": PATH}``, CLI ``--task-data
   piqa_local=PATH``): a file, or a folder searched for the file names below;
2. ``<data_dir>/<folder>/<file>`` where ``data_dir`` comes from the caller (CLI ``--data-dir``)
   or, when the caller gives none, from the environment variable ``BITCONVERT_DATA``.

There is no other default: a library that guessed paths would score whatever happens to lie there.

The harness calls the ``load_*`` functions below through ``custom_dataset`` in the task YAML,
with the TaskManager's metadata as keyword arguments (``data_dir``, ``data_paths``). Plain
``lm_eval --include_path <bitconvert>/eval/tasks --metadata '{"data_dir": "/data"}'`` works too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitconvert.eval.errors import EvalError

DATA_ENV = "BITCONVERT_DATA"
TASKS_DIR = Path(__file__).parent / "tasks"


# --------------------------------------------------------------------------- readers

def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number} is not valid JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{number} is not a JSON object")
            yield number, row


def _need(row: dict[str, Any], fields: tuple[str, ...], path: Path, number: int) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvalError(f"{path}:{number} lacks field(s) {', '.join(missing)} (has {', '.join(sorted(row)) or 'none'})")


def labels_file(path: Path) -> Path:
    """PIQA's release keeps answers in a separate file: ``valid.jsonl`` -> ``valid-labels.lst``."""
    return path.with_name(f"{path.stem}-labels.lst")


def read_piqa(path: Path) -> list[dict[str, Any]]:
    """PIQA rows ``{goal, sol1, sol2, label}``; labels inline or in ``<stem>-labels.lst`` (one per line)."""
    rows = []
    for number, row in _jsonl(path):
        _need(row, ("goal", "sol1", "sol2"), path, number)
        rows.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": row.get("label")})
    if any(r["label"] is None for r in rows):
        lst = labels_file(path)
        if not lst.is_file():
            raise EvalError(f"{path} has no 'label' field and its labels file {lst} does not exist")
        labels = [line.strip() for line in lst.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(labels) != len(rows):
            raise EvalError(f"{lst} holds {len(labels)} labels but {path} holds {len(rows)} questions")
        for row, label in zip(rows, labels):
            row["label"] = label
    for number, row in enumerate(rows, 1):
        if str(row["label"]) not in ("0", "1"):
            raise EvalError(f"PIQA item {number} of {path} has label {row['label']!r}; expected 0 or 1")
        row["label"] = int(row["label"])
    return rows


_ARTICLE_TITLE = re.compile(r"^ ?= [^=].* = ?$")


def read_wikitext(path: Path) -> list[dict[str, str]]:
    """WikiText split into articles ``{page}``, as the harness's document-level dataset holds them.

    A new article starts at every level-1 heading line (`` = Title = ``; section headings have
    two or more ``=``). Lines keep their original spacing; the harness's detokenizer runs later.
    """
    pages: list[str] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if _ARTICLE_TITLE.match(line.rstrip("\n")) and "".join(current).strip():
            pages.append("".join(current))
            current = []
        if current or line.strip():  # drop blank lines before the first title
            current.append(line)
    if "".join(current).strip():
        pages.append("".join(current))
    if not pages:
        raise EvalError(f"{path} holds no text")
    return [{"page": page} for page in pages]


def read_arc(path: Path) -> list[dict[str, Any]]:
    """ARC rows in the hub's shape ``{id, question, choices: {text, label}, answerKey}``.

    Accepts that shape and AI2's release shape (``question: {stem, choices: [{text, label}]}``).
    """
    rows = []
    for number, row in _jsonl(path):
        _need(row, ("question", "answerKey"), path, number)
        question = row["question"]
        if isinstance(question, dict):  # AI2 release
            _need(question, ("stem", "choices"), path, number)
            listed = question["choices"]
            choices = {"text": [c["text"] for c in listed], "label": [c["label"] for c in listed]}
            question = question["stem"]
        else:
            _need(row, ("choices",), path, number)
            choices = {"text": list(row["choices"]["text"]), "label": list(row["choices"]["label"])}
        if row["answerKey"] not in choices["label"]:
            raise EvalError(f"{path}:{number}: answerKey {row['answerKey']!r} is not one of {choices['label']}")
        rows.append({"id": str(row.get("id", number)), "question": question, "choices": choices,
                     "answerKey": row["answerKey"]})
    return rows


def read_hellaswag(path: Path) -> list[dict[str, Any]]:
    """HellaSwag rows as released (and as on the hub): ``{activity_label, ctx_a, ctx_b, endings, label}``."""
    rows = []
    fields = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    for number, row in _jsonl(path):
        _need(row, fields, path, number)
        rows.append({"ind": row.get("ind", number), **{f: row[f] for f in fields}})
    return rows


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class LocalTask:
    name: str
    hub_task: str  # the harness task whose prompt and metrics it reuses
    folder: str  # <data_dir>/<folder>/
    files: tuple[str, ...]  # file names tried in that folder, in order
    split: str  # the split name its YAML evaluates
    reader: Callable[[Path], list[dict[str, Any]]]
    note: str

    def yaml_path(self) -> Path:
        return TASKS_DIR / f"{self.name}.yaml"


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("piqa_local", "piqa", "piqa", ("valid.jsonl",), "validation", read_piqa,
              "PIQA validation (1838 items); labels inline or in valid-labels.lst"),
    LocalTask("wikitext_local", "wikitext", "wikitext-2", ("test.txt", "wiki.test.tokens", "wiki.test.raw"), "test",
              read_wikitext, "WikiText-2 test split into articles; the tokenized release (with <unk>) scores "
                             "differently from the harness's raw text, so compare only with itself"),
    LocalTask("arc_easy_local", "arc_easy", "ARC-Easy", ("ARC-Easy-Test.jsonl", "test.jsonl"), "test", read_arc,
              "ARC-Easy test; AI2 release or hub JSONL"),
    LocalTask("arc_challenge_local", "arc_challenge", "ARC-Challenge", ("ARC-Challenge-Test.jsonl", "test.jsonl"),
              "test", read_arc, "ARC-Challenge test; AI2 release or hub JSONL"),
    LocalTask("hellaswag_local", "hellaswag", "hellaswag", ("hellaswag_val.jsonl", "valid.jsonl", "validation.jsonl"),
              "validation", read_hellaswag, "HellaSwag validation; release or hub JSONL"),
)}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The caller's data folder, else ``$BITCONVERT_DATA``, else None. Never a guessed path."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        where = "--data-dir" if data_dir not in (None, "") else f"${DATA_ENV}"
        raise EvalError(f"data folder {path} (from {where}) does not exist")
    return path


def find_task_file(name: str, data_dir: str | os.PathLike | None = None,
                   data_paths: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """The data file a local task reads; a clear EvalError saying where it looked otherwise."""
    task = LOCAL_TASKS[name]
    explicit = (data_paths or {}).get(name)
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            for file in task.files:
                if (path / file).is_file():
                    return path / file
            raise EvalError(f"{name}: {path} holds none of {', '.join(task.files)}")
        raise EvalError(f"{name}: data path {path} does not exist")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise EvalError(f"{name} reads local files but no data folder was given: pass --data-dir DIR (or set "
                        f"${DATA_ENV}) with {task.folder}/{task.files[0]}, or --task-data {name}=FILE")
    tried = [root / task.folder / file for file in task.files]
    for path in tried:
        if path.is_file():
            return path
    others = f" (nor {', '.join(p.name for p in tried[1:])})" if len(tried) > 1 else ""
    raise EvalError(f"{name}: no data at {tried[0]}{others}; put {task.note.split(';')[0]} there "
                    f"or pass --task-data {name}=FILE")


def task_files(name: str, data_dir=None, data_paths=None) -> list[Path]:
    """Every file whose content decides a local task's docs (the data file and a labels file)."""
    path = find_task_file(name, data_dir, data_paths)
    extra = labels_file(path)
    return [path, extra] if name == "piqa_local" and extra.is_file() else [path]


# --------------------------------------------------------------------------- harness entry points

def load_docs(name: str, data_dir=None, data_paths=None) -> list[dict[str, Any]]:
    task = LOCAL_TASKS[name]
    return task.reader(find_task_file(name, data_dir, data_paths))


def _dataset(name: str, data_dir, data_paths):
    import datasets

    docs = load_docs(name, data_dir, data_paths)
    # Some harness process_docs functions call Dataset.map, so hand over a real Dataset, not a list.
    return datasets.DatasetDict({LOCAL_TASKS[name].split: datasets.Dataset.from_list(docs)})


def load_piqa(data_dir=None, data_paths=None, **_metadata):
    return _dataset("piqa_local", data_dir, data_paths)


def load_wikitext(data_dir=None, data_paths=None, **_metadata):
    return _dataset("wikitext_local", data_dir, data_paths)


def load_arc_easy(data_dir=None, data_paths=None, **_metadata):
    return _dataset("arc_easy_local", data_dir, data_paths)


def load_arc_challenge(data_dir=None, data_paths=None, **_metadata):
    return _dataset("arc_challenge_local", data_dir, data_paths)


def load_hellaswag(data_dir=None, data_paths=None, **_metadata):
    return _dataset("hellaswag_local", data_dir, data_paths)
