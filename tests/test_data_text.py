"""The pinned text protocol: splits, windows and their reproducibility."""

from __future__ import annotations

import pytest
import torch

from laserrmt.data.text import (
    calibration_texts,
    calibration_windows,
    evaluation_texts,
    evaluation_windows,
    shakespeare_windows,
    text_file_windows,
    token_windows,
    wikipedia_articles,
)
from laserrmt.errors import DataError
from tests.tiny_models import tiny_tokenizer


def test_protocol_splits():
    articles = wikipedia_articles()
    assert len(articles) == 106
    assert not any(a.lstrip().lower().startswith("#redirect") for a in articles)
    evaluation, calibration = evaluation_texts(), calibration_texts()
    assert (len(evaluation), len(calibration)) == (21, 85)
    assert evaluation == [articles[i] for i in range(4, 106, 5)]
    assert not set(evaluation) & set(calibration)


def test_windows_are_non_overlapping_cuts_of_one_tokenization():
    tok = tiny_tokenizer()
    texts = evaluation_texts()
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = evaluation_windows(tok, n_windows=3, window=100)
    assert windows.shape == (3, 100) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[:300]


def test_calibration_draw_is_seeded():
    tok = tiny_tokenizer()
    a = calibration_windows(tok, n_windows=4, window=64, seed=0)
    b = calibration_windows(tok, n_windows=4, window=64, seed=0)
    c = calibration_windows(tok, n_windows=4, window=64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    evaluation = {tuple(w.tolist()) for w in evaluation_windows(tok, n_windows=50, window=64)}
    assert not evaluation & {tuple(w.tolist()) for w in a}


def test_too_many_windows_is_a_clear_error():
    with pytest.raises(DataError, match=r"holds 1 windows of 8 tokens, 2 were asked"):
        token_windows(tiny_tokenizer(), ["abcdefghij"], window=8, n_windows=2)


def test_shakespeare_is_a_second_domain():
    windows = shakespeare_windows(tiny_tokenizer(), n_windows=2, window=64)
    text = tiny_tokenizer().decode(windows[0])
    assert windows.shape == (2, 64) and text.strip()


def test_text_files(tmp_path):
    tok = tiny_tokenizer()
    good = tmp_path / "a.txt"
    good.write_text("laser " * 100)
    assert text_file_windows(good, tok, window=50).shape == (12, 50)
    with pytest.raises(DataError, match="does not exist"):
        text_file_windows(tmp_path / "missing.txt", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        text_file_windows(empty, tok)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not UTF-8"):
        text_file_windows(binary, tok)
