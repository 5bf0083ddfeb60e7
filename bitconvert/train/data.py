"""Training text: read sources, tokenize into fixed-length blocks, and serve deterministic batches.
(Teacher-generated text is sampled in :mod:`bitconvert.train.sampling`.)

Batch ``k`` on rank ``r`` is a pure function of the seed, ``k`` and ``r``: that is what lets a run
resume exactly where it stopped, on any number of processes that divides the work the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bitconvert.recipes.schema import DataConfig, DataSource, GenerateSource
from bitconvert.train.sampling import generate_texts
from bitconvert.utils.io import atomic_write_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Training data is missing, empty or malformed."""


# --------------------------------------------------------------------------- reading text

def _json_texts(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        rows = payload if isinstance(payload, list) else payload.get(field, payload.get("data", []))
        for i, row in enumerate(rows):
            yield _field(row, field, f"{path} item {i}")
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number} is not valid JSON: {err}") from None
                yield _field(row, field, f"{path}:{number}")


def _field(row, field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or field not in row:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where} has no text field {field!r} (has {keys}); set text_field in the data source")
    return str(row[field])


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def local_path(text: str) -> Path:
    """A recipe's path with ``~`` and environment variables expanded (recipes say ${BITCONVERT_DATA}/...)."""
    return Path(os.path.expandvars(text)).expanduser()


def read_texts(source: DataSource) -> Iterator[str]:
    """The documents of one path or hub source, as strings."""
    if source.hub is not None:
        import datasets

        try:
            dataset = datasets.load_dataset(source.hub, source.config, split=source.split)
        except Exception as err:  # datasets raises many types for offline / missing
            raise DataError(f"could not load hub dataset {source.hub!r} split {source.split!r}: {err}") from err
        yield from (_field(row, source.text_field, f"{source.hub} row") for row in dataset)
        return
    path = local_path(source.path)
    if not path.exists():
        raise DataError(f"training data {path} does not exist")
    if path.is_dir() and _is_saved_dataset(path):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if source.split not in dataset:
                raise DataError(f"{path} has splits {list(dataset)}, not {source.split!r}")
            dataset = dataset[source.split]
        yield from (_field(row, source.text_field, f"{path} row") for row in dataset)
        return
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path} holds no .txt, .md, .jsonl or .json files")
    for file in files:
        if file.suffix in JSON_SUFFIXES:
            yield from _json_texts(file, source.text_field)
        elif file.suffix in TEXT_SUFFIXES or path.is_file():
            yield file.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------- prompts for teacher text

def prompts_from_file(config: GenerateSource, tokenizer, seed: int) -> torch.Tensor:
    """The first ``prompt_tokens`` tokens of every long-enough line of the file, in a seeded order:
    equal-length prompts, so a batch needs no padding."""
    path = local_path(config.prompts_from)
    if not path.is_file():
        raise DataError(f"generate.prompts_from: no such file: {path}")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"]
    prompts = [ids[: config.prompt_tokens] for ids in encoded if len(ids) >= config.prompt_tokens]
    if not prompts:
        raise DataError(f"generate.prompts_from: no line of {path} has {config.prompt_tokens} tokens")
    table = torch.tensor(prompts, dtype=torch.long)
    return table[torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))]


def chat_opening(tokenizer) -> tuple[torch.Tensor, set[int]]:
    """The chat template up to where the user's first message goes, as ``(1, n)`` ids, and every id the template
    writes around a message (its turn markers). From that opening an instruct teacher writes a request and then
    answers it (Magpie, Xu et al. 2024): the kind of text it was tuned on, with no prompt of ours."""
    marker = "\ue000"  # a private-use character: no template writes it, so it shows where the message goes
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception as err:  # transformers raises ValueError without a template; a template may raise anything
        raise DataError(f"generate.chat needs a tokenizer with a chat template ({type(err).__name__}: {err})") from None
    if not isinstance(rendered, str) or rendered.count(marker) != 1:
        raise DataError("generate.chat: the tokenizer's chat template does not write the user's message once")
    opening = rendered[: rendered.index(marker)]
    ids = tokenizer(opening, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("generate.chat: the tokenizer's chat template writes nothing before the user's message")
    written = tokenizer(rendered.replace(marker, ""), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long), set(written)


# --------------------------------------------------------------------------- blocks and batches

def tokenize_blocks(texts, tokenizer, sequence_length: int, chunk_documents: int = 1024) -> torch.Tensor:
    """Concatenate documents (each closed by EOS) and cut into ``(n, sequence_length)`` blocks."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    chunk: list[str] = []

    def flush() -> None:
        # One call per chunk of documents: a fast tokenizer encodes a list in parallel, and millions
        # of teacher tokens arrive as thousands of short documents.
        for encoded in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            if eos is not None:
                ids.append(eos)
        chunk.clear()

    for text in texts:
        if text:
            chunk.append(text)
            if len(chunk) >= chunk_documents:
                flush()
    if chunk:
        flush()
    n = len(ids) // sequence_length
    return torch.tensor(ids[: n * sequence_length], dtype=torch.long).reshape(n, sequence_length)


@dataclass
class TrainingData:
    """Token blocks of every source plus a deterministic, weighted, epoch-wise shuffled order."""

    pool: torch.Tensor  # (n, sequence_length): all training blocks, each source repeated to its weight
    eval_blocks: torch.Tensor | None
    seed: int
    fingerprint: str  # changes when the blocks change; a resumed run checks it
    _epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def sequence_length(self) -> int:
        return self.pool.shape[1]

    def batch(self, micro_step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Blocks for one micro-batch of one rank. ``micro_step`` counts micro-batches from the start."""
        return self.blocks((micro_step * world + rank) * batch_size, batch_size)

    def blocks(self, first: int, batch_size: int) -> torch.Tensor:
        """``batch_size`` blocks from position ``first`` of the endless shuffled stream (epoch after epoch)."""
        rows = []
        for g in range(first, first + batch_size):
            epoch, position = divmod(g, len(self.pool))
            rows.append(self._order(epoch)[position])
        return self.pool[torch.stack(rows)]

    def _order(self, epoch: int) -> torch.Tensor:
        """The shuffled order of one epoch (kept for the current epoch only)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.pool), generator=generator))
        return self._epoch_order[1]


MAX_POOL_GROWTH = 8  # the pool may hold up to this many times the blocks the sources have


def _mix(blocks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Repeat each source so that its share of the pool matches its weight.

    The pool is as large as it takes for every block of every source to be in it (a small source with a
    large weight repeats), up to MAX_POOL_GROWTH times the blocks there are; only past that is a source
    cut to its share, with a warning. (A pool of just the total number of blocks would cut the largest
    source whenever its weight is below its share of the blocks: most of the teacher text, for example.)
    """
    if len(blocks) == 1:
        return blocks[0]
    total = sum(len(b) for b in blocks)
    shares = [w / sum(weights) for w in weights]
    size = min(max(total, *(math.ceil(len(b) / share) for b, share in zip(blocks, shares))), MAX_POOL_GROWTH * total)
    parts = []
    for index, (b, share) in enumerate(zip(blocks, shares)):
        want = max(1, round(share * size))
        if want < len(b):
            log.warning("data source %d: only %d of its %d blocks fit its weight's share of the pool", index, want, len(b))
        parts.append(b.repeat((want + len(b) - 1) // len(b), 1)[:want])
    return torch.cat(parts)


def build_training_data(config: DataConfig, tokenizer, *, seed: int, cache_dir: Path,
                        teacher=None, device="cpu", is_main: bool = True, wait=lambda: None) -> TrainingData:
    """Read, tokenize and mix every source. Teacher samples are cached in ``cache_dir``."""
    blocks, weights = [], []
    for index, source in enumerate(config.train):
        if source.generate is not None:
            texts = _generated(source.generate, index, teacher, tokenizer, seed, cache_dir, device, is_main, wait)
        else:
            texts = read_texts(source)
        tokens = tokenize_blocks(texts, tokenizer, config.sequence_length)
        if len(tokens) == 0:
            raise DataError(f"data source {index} ({source.path or source.hub or 'generate'}) yields less than one "
                            f"block of {config.sequence_length} tokens")
        log.info("data source %d: %d blocks of %d tokens", index, len(tokens), config.sequence_length)
        blocks.append(tokens)
        weights.append(source.weight)
    eval_blocks = None
    if config.eval is not None:
        eval_blocks = tokenize_blocks(read_texts(config.eval), tokenizer,
                                      config.eval_sequence_length or config.sequence_length)
    elif config.eval_fraction > 0:
        first = blocks[0]
        order = torch.randperm(len(first), generator=torch.Generator().manual_seed(seed))
        held = max(1, int(len(first) * config.eval_fraction))
        eval_blocks, blocks[0] = first[order[:held]], first[order[held:]]
    pool = _mix(blocks, weights)
    digest = hashlib.sha256(pool.numpy().tobytes()).hexdigest()[:16]
    return TrainingData(pool=pool, eval_blocks=eval_blocks, seed=seed, fingerprint=digest)


def _generated(config: GenerateSource, index: int, teacher, tokenizer, seed: int, cache_dir: Path, device,
               is_main: bool, wait) -> list[str]:
    prompts = local_path(config.prompts_from) if config.prompts_from else None
    prompt_file = prompts.read_bytes() if prompts is not None and prompts.is_file() else b""
    key = hashlib.sha256(config.model_dump_json().encode() + str(seed).encode() + prompt_file).hexdigest()[:12]
    cache = cache_dir / f"generated-{index}-{key}.jsonl"
    if is_main and not cache.is_file():
        if teacher is None:
            raise DataError("data source 'generate' needs the teacher model (train.mode: distill)")
        texts = generate_texts(teacher, tokenizer, config, seed=seed + index, device=device)
        atomic_write_text(cache, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    wait()
    return [json.loads(line)["text"] for line in cache.read_text().splitlines() if line.strip()]
