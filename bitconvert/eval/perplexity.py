"""Quick perplexity on any text file, through the harness's rolling log-likelihood.

The file is one token stream, cut into disjoint windows of the model's max length (the harness's
``loglikelihood_rolling``: every token is predicted once, the first from the BOS/EOS prefix).
Token perplexity is only comparable between models that share a tokenizer, which an export and
its source do; the result records a tokenizer fingerprint so that the report can say when they
don't. Bits per byte compare across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

PERPLEXITY_METRICS = {"token_perplexity": False, "word_perplexity": False, "bits_per_byte": False}  # higher is better?


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _truncate(lm, text: str, max_tokens: int) -> str:
    """The prefix of ``text`` that holds its first ``max_tokens`` tokens (used by ``limit``)."""
    tokenizer = lm.tokenizer
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], clean_up_tokenization_spaces=False)


def rolling_perplexity(lm, path: str | Path, *, max_windows: int | None = None) -> dict[str, Any]:
    """Score a text file with a harness LM (``HFLM``); ``max_windows`` keeps only the first windows."""
    from lm_eval.api.instance import Instance

    text = Path(path).read_text(encoding="utf-8")
    if max_windows is not None:
        text = _truncate(lm, text, max_windows * lm.max_length)
    request = Instance(request_type="loglikelihood_rolling", doc={"path": str(path)}, arguments=(text,), idx=0)
    (loglikelihood,) = lm.loglikelihood_rolling([request])
    tokens = len(lm.tok_encode(text))  # exactly the tokens the rolling windows predicted
    n_bytes = len(text.encode("utf-8"))
    words = len(text.split())
    return {
        "token_perplexity": math.exp(-loglikelihood / tokens),
        "word_perplexity": math.exp(-loglikelihood / words),
        "bits_per_byte": -loglikelihood / (n_bytes * math.log(2)),
        "loglikelihood": loglikelihood, "tokens": tokens, "words": words, "bytes": n_bytes,
        "max_length": lm.max_length, "windows": math.ceil(tokens / lm.max_length),
        "tokenizer": tokenizer_fingerprint(lm.tokenizer),
    }
