"""benchmarks/deploy.py's classifier section, run end to end on a tiny BERT and a tiny CSV.

The real run (MiniLM, BBC News) is the lead's; this checks the code path: the short RMT-KD run,
the four exports and the side-by-side latency table.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import laserrmt
from benchmarks.deploy import GRAPH_FILE, classifier_section, classifier_variants
from laserrmt.data.sources import open_text_source
from tests.tiny_models import tiny_bert, tiny_tokenizer

ort = pytest.importorskip("onnxruntime")

TOPICS = ["markets", "football", "elections", "films", "phones"]


def _labelled_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = {t: [f"{t}{i}" for i in range(6)] for t in TOPICS}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for topic in TOPICS:
            for _ in range(16):
                writer.writerow([" ".join(rng.choice(words[topic], 8)), topic])
    return path


def test_classifier_section_compares_the_cut_graph_with_the_dense_one(tmp_path: Path) -> None:
    data = open_text_source(_labelled_csv(tmp_path / "news.csv"), label_column="label")
    variants, notes = classifier_variants(
        tiny_bert(), tiny_tokenizer(), tmp_path / "cache", steps=1, data=data, max_length=24
    )
    assert [(v.model, v.runtime) for v in variants] == [
        ("dense", "ONNX Runtime float32"),
        ("dense", "ONNX Runtime int8"),
        ("RMT-KD", "ONNX Runtime float32"),
        ("RMT-KD", "ONNX Runtime int8"),
    ]
    dense, dense8, cut, cut8 = (v.bytes for v in variants)
    assert cut < dense and dense8 < dense and cut8 < cut

    # The measured RMT-KD graph is the cut model: same logits as it, reloaded, in torch.
    model, _ = laserrmt.load(tmp_path / "cache" / "classifier-rmt-kd")
    ids = torch.randint(1, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(variants[2].folder / GRAPH_FILE))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feed["token_type_ids"] = torch.zeros_like(ids)
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        expected = model(**feed).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    heading, body = classifier_section(variants, notes, [8, 16], repeats=2, threads=1)
    assert "latency" in heading and "accuracy is not measured" in body
    table = [line for line in body.splitlines() if line.startswith("| ") and "ONNX" in line]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert len(cells) == 4
    assert cells[0][3] == "1.00"  # bytes ratio of dense float32 to itself
    assert cells[0][5] == cells[0][7] == "1.00"  # its speed-up at both lengths
    assert float(cells[2][3]) == pytest.approx(dense / cut, abs=0.01)
    assert all(float(row[i]) > 0 for row in cells for i in (4, 6))
    assert any("label agreement" in note for note in notes)
