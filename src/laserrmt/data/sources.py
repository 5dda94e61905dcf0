"""A user's own text: one file, a folder of files, JSONL, CSV or a saved ``datasets`` folder.

A :class:`TextSource` names the text by path, format, column and the SHA-256 of its content, so
that it can be recorded in a plan or report and read again later: reading refuses (one line)
when the content no longer matches the recorded digest. Its documents are cut into token
windows exactly as the pinned protocol's splits are (:func:`laserrmt.data.text.token_windows`):
joined with a blank line, tokenized once, cut into non-overlapping windows.

Calibration never sees evaluation text: :func:`check_disjoint` refuses a calibration source and
an evaluation source that share a document (compared by the SHA-256 of each document); it does
not split a shared file, because a split the user did not choose would be invisible in reports.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from laserrmt.data.text import WINDOW, read_utf8, token_windows
from laserrmt.errors import DataError

__all__ = ["FORMATS", "TextSource", "check_disjoint", "open_text_source"]

#: The formats a source can have: ``text`` (one UTF-8 file, one document), ``folder`` (every
#: ``.txt``/``.md`` file in it, sorted by relative path, one document each), ``jsonl`` and
#: ``csv`` (one document per row, from a named column), ``datasets`` (a folder written by
#: ``datasets``' ``save_to_disk``, one document per row).
FORMATS = ("text", "folder", "jsonl", "csv", "datasets")
FOLDER_SUFFIXES = (".txt", ".md")
_DATASETS_INSTALL = "pip install 'laserrmt[datasets]'"
# Files save_to_disk writes next to its Arrow shards; one of them marks a datasets folder.
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class TextSource:
    """A user's text, named so that it can be recorded and re-read.

    Attributes:
        path: the file or folder, as given.
        format: one of :data:`FORMATS`.
        column: the text column of ``jsonl``, ``csv`` and ``datasets`` sources, else ``None``.
        sha256: digest of the content (file bytes; for folders, every file's relative path and
            bytes in sorted order).
        label_column: the label column of labelled data (classification), else ``None``.
    """

    path: str
    format: str
    column: str | None
    sha256: str
    label_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextSource:
        try:
            return cls(
                path=str(data["path"]),
                format=str(data["format"]),
                column=data.get("column"),
                sha256=str(data["sha256"]),
                label_column=data.get("label_column"),
            )
        except KeyError as exc:
            raise DataError(f"a recorded text source lacks {exc.args[0]!r}") from None

    def documents(self) -> list[str]:
        """The documents, in order, after checking the content still has the recorded digest.

        Raises:
            DataError: the content changed since it was recorded, or it cannot be read.
        """
        digest = _content_sha256(Path(self.path), self.format)
        if digest != self.sha256:
            raise DataError(
                f"{self.path} changed since it was recorded (SHA-256 {digest[:12]}…, recorded "
                f"{self.sha256[:12]}…); restore the recorded file or make a new plan from it"
            )
        return _read_documents(Path(self.path), self.format, self.column)

    def labels(self) -> list[str]:
        """The label of every document, as text (``3`` and ``"3"`` are one label).

        Raises:
            DataError: the source has no label column, or the content changed.
        """
        if self.label_column is None:
            raise DataError(f"{self.path} was opened without a label column; pass --label-column")
        self.documents()  # checks the digest
        return _read_documents(Path(self.path), self.format, self.label_column, labels=True)

    def windows(
        self,
        tokenizer: Any,
        n_windows: int | None = None,
        window: int = WINDOW,
        seed: int | None = None,
        at_most: bool = False,
    ) -> torch.Tensor:
        """Token windows of the documents, cut like the pinned protocol's splits.

        ``seed=None`` gives the first ``n_windows`` windows (evaluation); an integer draws them
        as the protocol draws calibration windows. ``n_windows=None`` gives all of them;
        ``at_most`` gives all of them when fewer than ``n_windows`` exist.

        Raises:
            DataError: the content changed, or it holds fewer windows than asked for (the
                message says how many it holds).
        """
        return token_windows(
            tokenizer,
            self.documents(),
            window=window,
            n_windows=n_windows,
            seed=seed,
            what=f"{self.path} ({self.format})",
            at_most=at_most,
        )


def open_text_source(
    path: str | os.PathLike[str],
    column: str = "text",
    format: str | None = None,
    label_column: str | None = None,
) -> TextSource:
    """Name a user's text and check that it reads: at least one non-empty document.

    The format is ``format`` or, when ``None``, found from the path: a folder written by
    ``save_to_disk`` is ``datasets``, another folder is ``folder``, ``.jsonl``/``.json`` is
    ``jsonl``, ``.csv`` is ``csv``, anything else ``text``. ``column`` is used by the
    formats with columns and ignored by the others. ``label_column`` makes it labelled data
    (classification), which needs a format with columns.

    Raises:
        DataError: the path does not exist, the format is unknown, a column is missing, a
            row is malformed, a label is empty, or there is no text.
    """
    where = Path(path)
    if not where.exists():
        raise DataError(
            f"{where} does not exist; pass a text file, a folder, JSONL, CSV or a "
            "saved datasets folder"
        )
    found = format or _detect_format(where)
    if found not in FORMATS:
        raise DataError(f"unknown data format {found!r}; choose one of {', '.join(FORMATS)}")
    if (found in ("folder", "datasets")) != where.is_dir():
        kind = "a folder" if found in ("folder", "datasets") else "a file"
        raise DataError(f"{where}: format {found} needs {kind}")
    columns = found in ("jsonl", "csv", "datasets")
    if label_column is not None and not columns:
        raise DataError(
            f"{where} is {found} data, which has no labels; give labelled text as JSONL, CSV "
            "or a datasets folder with a label column"
        )
    source = TextSource(
        path=str(where),
        format=found,
        column=column if columns else None,
        sha256=_content_sha256(where, found),
        label_column=label_column,
    )
    documents = _read_documents(where, found, source.column)
    if not any(document.strip() for document in documents):
        raise DataError(f"{where} holds no text; pass data with text in it")
    if label_column is not None:
        labels = _read_documents(where, found, label_column, labels=True)
        if "" in labels:
            raise DataError(
                f"{where} row {labels.index('') + 1} has an empty {label_column!r}; label every row"
            )
    return source


def check_disjoint(calibration: TextSource, evaluation: TextSource) -> None:
    """Refuse calibration text that shares a document with evaluation text.

    Raises:
        DataError: the two sources are the same content or share at least one document.
    """
    if calibration.sha256 == evaluation.sha256:
        raise DataError(
            f"--calibration-data {calibration.path} and --eval-data {evaluation.path} are the "
            "same text; calibrate and evaluate on different documents"
        )
    evaluated = {_digest(d) for d in evaluation.documents() if d.strip()}
    shared = sum(_digest(d) in evaluated for d in calibration.documents() if d.strip())
    if shared:
        raise DataError(
            f"--calibration-data {calibration.path} shares {shared} document(s) with --eval-data "
            f"{evaluation.path}; remove them from one of the two"
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASETS_MARKERS):
            return "datasets"
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "text"


def _folder_files(path: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    files = sorted(
        (f for f in path.rglob("*") if f.is_file()),
        key=lambda f: f.relative_to(path).as_posix(),
    )
    if suffixes is None:
        return files
    return [f for f in files if f.suffix.lower() in suffixes]


def _content_sha256(path: Path, format: str) -> str:
    if not path.exists():
        raise DataError(f"{path} does not exist; pass the path of the data it was made with")
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    suffixes = FOLDER_SUFFIXES if format == "folder" else None
    for file in _folder_files(path, suffixes):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _read_documents(path: Path, format: str, column: str | None, labels: bool = False) -> list[str]:
    """One value per document: its text, or (``labels``) its label as text."""
    if format == "text":
        return [read_utf8(path)]
    if format == "folder":
        files = _folder_files(path, FOLDER_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no .txt or .md files; put the text files in it")
        return [read_utf8(file) for file in files]
    assert column is not None
    if format == "jsonl":
        return _jsonl_column(path, column, labels)
    if format == "csv":
        return _csv_column(path, column, labels)
    return _datasets_column(path, column, labels)


def _option(labels: bool) -> str:
    return "--label-column" if labels else "--text-column"


def _text_value(value: Any, where: str, column: str, labels: bool) -> str:
    """A row's text, or its label as text (integer labels allowed)."""
    if isinstance(value, str):
        return value.strip() if labels else value
    if labels and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = "text or integer labels" if labels else "text"
    raise DataError(
        f"{where}: column {column!r} holds {type(value).__name__}, not {kind}; "
        f"name the right column with {_option(labels)}"
    )


def _jsonl_column(path: Path, column: str, labels: bool) -> list[str]:
    texts = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not JSON ({exc.msg}); write one object per line"
            ) from None
        if not isinstance(row, dict) or column not in row:
            keys = ", ".join(row) if isinstance(row, dict) else "none"
            raise DataError(
                f"{path} line {number} has no column {column!r} (columns: {keys}); "
                f"name the column with {_option(labels)}"
            )
        texts.append(_text_value(row[column], f"{path} line {number}", column, labels))
    if not texts:
        raise DataError(f"{path} holds no rows; pass a JSONL file with one object per line")
    return texts


def _csv_column(path: Path, column: str, labels: bool) -> list[str]:
    rows = csv.DictReader(read_utf8(path).splitlines(keepends=True))
    names = rows.fieldnames or []
    if column not in names:
        raise DataError(
            f"{path} has no column {column!r} (columns: {', '.join(names) or 'none'}); "
            f"name the column with {_option(labels)}"
        )
    texts = [(row[column] or "").strip() if labels else row[column] or "" for row in rows]
    if not texts:
        raise DataError(f"{path} holds no rows under its header; add rows of text")
    return texts


def _datasets_column(path: Path, column: str, labels: bool) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"{path} is a datasets folder and the datasets package is not installed; "
            f"install it with: {_DATASETS_INSTALL}"
        )
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise DataError(
                f"{path} holds the splits {', '.join(splits)}; pass one split's folder, "
                f"e.g. {path / splits[0]}"
            )
        loaded = loaded[splits[0]]
    if column not in loaded.column_names:
        raise DataError(
            f"{path} has no column {column!r} (columns: {', '.join(loaded.column_names)}); "
            f"name the column with {_option(labels)}"
        )
    values = loaded[column]
    return [_text_value(v, f"{path} row {i}", column, labels) for i, v in enumerate(values)]
