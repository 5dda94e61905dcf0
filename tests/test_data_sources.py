"""A user's own text: every format reads the documents written here, bad data gets one line,
calibration never shares a document with evaluation, and a plan made on a user's file replays
the same model or refuses once the file changed."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

import laserrmt
from laserrmt.cli import main
from laserrmt.data.sources import TextSource, check_disjoint, open_text_source
from laserrmt.errors import DataError
from laserrmt.pipeline import USER_CALIBRATION_SOURCE, CompressSettings, compress
from laserrmt.plan import CompressionPlan
from tests.small_text import small_calibration_split
from tests.tiny_models import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

DOCS = [
    'first document, with a comma and "quotes"',
    "second document\nover two lines",
    "third document",
]


def _words(seed: int, count: int) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz.,;!?"))
    return " ".join("".join(rng.choice(letters, size=int(n))) for n in rng.integers(1, 9, count))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _write(tmp_path, kind, docs=DOCS, column="text"):
    """``docs`` written in format ``kind`` under ``tmp_path``; the path to pass."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path = tmp_path / "one.txt"
        path.write_text("\n\n".join(docs), encoding="utf-8")
    elif kind == "folder":
        path = tmp_path / "folder"
        (path / "sub").mkdir(parents=True)
        # Read in sorted relative-path order; other suffixes are not text.
        for i, doc in enumerate(docs):
            name = f"{i:02d}.md" if i % 2 else f"{i:02d}.txt"
            (path / name).write_text(doc, encoding="utf-8")
        (path / "zz.csv").write_text("ignored", encoding="utf-8")
    elif kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        lines = [json.dumps({"id": i, column: doc}) for i, doc in enumerate(docs)]
        path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    elif kind == "csv":
        path = tmp_path / "rows.csv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", column])
            writer.writerows(enumerate(docs))
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"id": list(range(len(docs))), column: docs}).save_to_disk(
            str(path)
        )
    return path


@pytest.mark.parametrize("kind", ["folder", "jsonl", "csv", "datasets"])
def test_each_format_reads_the_documents_written(tmp_path, kind):
    source = open_text_source(_write(tmp_path, kind))
    assert source.format == kind
    assert source.documents() == DOCS


def test_a_text_file_is_one_document(tmp_path):
    source = open_text_source(_write(tmp_path, "text"))
    assert source.format == "text" and source.column is None
    assert source.documents() == ["\n\n".join(DOCS)]


@pytest.mark.parametrize("kind", ["text", "folder", "jsonl", "csv", "datasets"])
def test_windows_are_the_joined_documents_cut_in_order(tmp_path, kind, tokenizer):
    """The byte-level tokenizer has one token per byte: the windows decode to the documents
    joined with a blank line, cut at multiples of the window, tail dropped."""
    source = open_text_source(_write(tmp_path, kind))
    windows = source.windows(tokenizer, window=10)
    joined = "\n\n".join(DOCS)
    assert windows.shape == (len(joined) // 10, 10)
    for i, row in enumerate(windows):
        assert tokenizer.decode(row) == joined[10 * i : 10 * i + 10]


def test_the_content_digest_is_of_the_file_bytes(tmp_path):
    path = _write(tmp_path, "csv")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_text_source(path).sha256 == expected
    assert TextSource.from_dict(open_text_source(path).to_dict()).sha256 == expected


def test_another_text_column(tmp_path):
    path = _write(tmp_path, "jsonl", column="body")
    assert open_text_source(path, column="body").documents() == DOCS


@pytest.mark.parametrize("kind", ["jsonl", "csv", "datasets"])
def test_a_missing_column_names_the_columns_there(tmp_path, kind):
    path = _write(tmp_path, kind)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: id, text\).*--text-column"):
        open_text_source(path, column="body")


def test_bad_data_gets_one_clear_line(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        open_text_source(tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        open_text_source(empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"no \.txt or \.md files"):
        open_text_source(tmp_path / "nothing")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not JSON"):
        open_text_source(broken)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="holds int, not text"):
        open_text_source(numbers)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        open_text_source(header_only)
    with pytest.raises(DataError, match="unknown data format"):
        open_text_source(empty, format="parquet")
    short = open_text_source(_write(tmp_path, "csv"))
    total = len("\n\n".join(DOCS))
    with pytest.raises(DataError, match=rf"holds 1 windows of 64 tokens \({total} tokens\) and 3"):
        short.windows(tokenizer, n_windows=3, window=64)


def test_a_datasets_folder_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "saved"
    path.mkdir()
    (path / "dataset_info.json").write_text("{}")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name)
    )
    with pytest.raises(DataError, match=r"pip install 'laserrmt\[datasets\]'"):
        open_text_source(path)


def test_a_changed_file_is_refused(tmp_path):
    path = _write(tmp_path, "folder")
    source = open_text_source(path)
    (path / "00.txt").write_text("edited", encoding="utf-8")
    with pytest.raises(DataError, match="changed since it was recorded"):
        source.documents()


def test_calibration_never_shares_a_document_with_evaluation(tmp_path):
    one = open_text_source(_write(tmp_path / "a", "jsonl"))
    # A copy elsewhere is the same content: compared by digest, not by path.
    with pytest.raises(DataError, match="same text"):
        check_disjoint(one, open_text_source(_write(tmp_path / "copy", "jsonl")))
    # Other formats, one document in common: still refused.
    overlapping = open_text_source(_write(tmp_path / "b", "folder", docs=[DOCS[1], "other"]))
    with pytest.raises(DataError, match="shares 1 document"):
        check_disjoint(one, overlapping)
    disjoint = open_text_source(_write(tmp_path / "c", "folder", docs=["other", "more"]))
    check_disjoint(one, disjoint)


IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))
RUN = {"method": "budget", "target_params": 0.3, "calibration_windows": 2, "window": 64}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_a_plan_made_on_a_user_file_replays_it_and_refuses_it_changed(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(_words(1, 400), encoding="utf-8")
    model, result = compress(
        tiny_llama(), tiny_tokenizer(), calibration_data=path, progress=False, **RUN
    )
    record = result.plan.factors.calibration
    assert record["source"] == USER_CALIBRATION_SOURCE
    assert record["data"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = result.plan.save(tmp_path / "plan.json")

    def replay():
        replayed, _ = compress(
            tiny_llama(),
            tiny_tokenizer(),
            settings=CompressSettings(),
            plan=CompressionPlan.load(saved),
            progress=False,
        )
        return replayed

    assert torch.allclose(_logits(replay()), _logits(model), atol=1e-5, rtol=0)
    # The factors depend on the text: the same ranks whitened on other text differ.
    with small_calibration_split():
        other, _ = compress(tiny_llama(), tiny_tokenizer(), progress=False, **RUN)
    assert (_logits(other) - _logits(model)).abs().max() > 1e-3
    path.write_text(_words(2, 400), encoding="utf-8")
    with pytest.raises(DataError, match="changed since it was recorded"):
        replay()


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("laserrmt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_command_line_calibrates_on_one_text_and_evaluates_on_another(capsys, tmp_path):
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(_words(3, 600), encoding="utf-8")
    evaluation = _write(tmp_path, "jsonl", docs=[_words(4, 300), _words(5, 300)], column="body")
    out = tmp_path / "out"
    common = ["--quiet", "compress", str(folder), "--whiten", "svdllm", "--target-params", "0.3"]
    data = ["--calibration-windows", "1", "--eval-windows", "2", "--no-latency"]
    args = [*common, *data, "--calibration-data", str(calibration)]
    assert (
        main([*args, "--eval-data", str(evaluation), "--text-column", "body", "--out", str(out)])
        == 0
    )
    record = json.loads((out / "laserrmt.json").read_text())["plan"]["factors"]["calibration"]
    assert record["data"]["path"] == str(calibration)
    after = json.loads((out / "evaluation.json").read_text())["after"]
    assert after["protocol"]["name"] == "user-data" and after["protocol"]["pinned"] is False
    assert after["protocol"]["data"]["path"] == str(evaluation)
    assert after["eval_windows"] == 2
    # The report names both texts; it once said "pinned protocol" whatever was evaluated.
    html = (out / "report.html").read_text()
    assert f"your data {calibration}" in html and f"Perplexity on your data {evaluation}" in html
    # The same model evaluated on the same text by the evaluate command gives the same number.
    report = tmp_path / "evaluate.json"
    assert main(["--quiet", "evaluate", str(out), "--eval-data", str(evaluation),
                 "--text-column", "body", "--eval-windows", "2", "--no-latency",
                 "--json", str(report)]) == 0  # fmt: skip
    again = json.loads(report.read_text())
    assert again["perplexity"] == pytest.approx(after["perplexity"], rel=1e-5)
    model, _ = laserrmt.load(out)
    assert model is not None
    capsys.readouterr()
    # Evaluation text given again as calibration text: refused before the model loads.
    code = main([*args[:-1], str(evaluation), "--text-column", "body", "--eval-data",
                 str(evaluation), "--out", str(tmp_path / "refused")])  # fmt: skip
    assert code == 2
    assert "same text" in _one_error_line(capsys.readouterr().err)
    code = main([*common, *data, "--calibration-data", str(evaluation), "--out",
                 str(tmp_path / "no-column")])  # fmt: skip
    assert code == 2
    assert "no column 'text'" in _one_error_line(capsys.readouterr().err)


def test_analyze_whitens_on_a_user_folder(capsys, tmp_path):
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    texts = _write(tmp_path, "folder", docs=[_words(6, 200), _words(7, 200)])
    out = tmp_path / "analysis"
    assert main(["--quiet", "analyze", str(folder), "--out", str(out), "--whiten", "svdllm",
                 "--calibration-data", str(texts), "--calibration-windows", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["--quiet", "analyze", str(folder), "--out", str(tmp_path / "a2"), "--whiten",
                 "svdllm", "--calibration-data", str(texts), "--calibration-windows", "9"])  # fmt: skip
    assert code == 2
    assert "windows of 512 tokens" in _one_error_line(capsys.readouterr().err)


def test_rmt_kd_on_a_causal_lm_draws_its_windows_from_a_user_file(tmp_path):
    from laserrmt.errors import InvalidOptionError
    from laserrmt.methods.rmt_kd import replay_calibration, run_rmt_kd

    path = tmp_path / "calibration.txt"
    text = _words(8, 120)
    path.write_text(text, encoding="utf-8")
    tokenizer = tiny_tokenizer()
    result = run_rmt_kd(
        tiny_llama(),
        tokenizer,
        task="causal-lm",
        data=open_text_source(path),
        n_windows=4,
        window=32,
        validation_windows=1,
        steps_per_cut=1,
        tolerance=10.0,
        max_cuts=1,
        progress=False,
    )
    recipe = result.plan.calibration["recipe"]
    assert recipe["dataset"] == "user data"
    assert recipe["data"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    batches = replay_calibration(result.plan, tokenizer)
    assert len(batches) == 3
    for batch in batches:
        piece = tokenizer.decode(batch[0])  # a causal LM's batch is its token ids
        start = text.index(piece)
        assert len(piece) == 32 and start % 32 == 0
    path.write_text(_words(9, 120), encoding="utf-8")
    with pytest.raises(DataError, match="changed since it was recorded"):
        replay_calibration(result.plan, tokenizer)
    with pytest.raises(InvalidOptionError, match="classification data needs labels"):
        run_rmt_kd(tiny_llama(), tokenizer, task="classification", data=open_text_source(tmp_path))


def _labelled_rows(per_label=6):
    topics = {"sport": "the match ended with a late goal", "money": "shares fell as rates rose"}
    return [
        {"body": f"{text} {i}", "topic": topic}
        for topic, text in topics.items()
        for i in range(per_label)
    ]


def test_labelled_text_is_split_by_label(tmp_path):
    from laserrmt.data.classification import labelled_split

    path = tmp_path / "labelled.csv"
    rows = _labelled_rows()
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["body", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    source = open_text_source(path, column="body", label_column="topic")
    split = labelled_split(source, seed=0)
    assert split.label_names == ["money", "sport"]
    truth = {row["body"]: row["topic"] for row in rows}
    texts = split.train_texts + split.test_texts
    labels = split.train_labels + split.test_labels
    assert sorted(texts) == sorted(truth)
    assert all(
        split.label_names[label] == truth[text] for text, label in zip(texts, labels, strict=True)
    )
    assert sorted(split.test_labels) == [0, 0, 1, 1]  # 30 % of 12, stratified: 2 per label
    with pytest.raises(DataError, match=r"no column 'label'.*--label-column"):
        open_text_source(path, column="body", label_column="label")
    with pytest.raises(DataError, match="has no labels"):
        open_text_source(_write(tmp_path, "text"), label_column="topic")
    one_label = tmp_path / "one.jsonl"
    one_label.write_text("".join(json.dumps({"text": "x", "label": 1}) + "\n" for _ in range(4)))
    with pytest.raises(DataError, match="1 distinct label"):
        labelled_split(open_text_source(one_label, label_column="label"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "x", "label": " "}) + "\n")
    with pytest.raises(DataError, match="row 1 has an empty 'label'"):
        open_text_source(blank, label_column="label")


def test_rmt_kd_classifies_user_labelled_data_and_refuses_a_head_of_another_size(tmp_path):
    from laserrmt.methods.rmt_kd import run_rmt_kd

    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _labelled_rows(10)))
    source = open_text_source(path, column="body", label_column="topic")
    result = run_rmt_kd(
        tiny_bert(num_labels=2),
        tiny_tokenizer(),
        task="classification",
        data=source,
        sites=["mlp"],
        steps_per_cut=1,
        tolerance=100.0,
        max_length=16,
        batch_size=4,
        max_cuts=1,
        progress=False,
    )
    assert result.settings["label_names"] == ["money", "sport"]
    assert result.plan.calibration["recipe"]["data"]["label_column"] == "topic"
    with pytest.raises(DataError, match=r"2 labels .* and the classifier 3 outputs"):
        run_rmt_kd(tiny_bert(num_labels=3), tiny_tokenizer(), task="classification", data=source)


def test_an_image_folder_is_read_with_its_class_names(tmp_path, monkeypatch):
    image = pytest.importorskip("PIL.Image")
    from laserrmt.data.classification import image_folder

    rng = np.random.default_rng(0)
    pixels = {}
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            values = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
            image.fromarray(values, mode="L").save(tmp_path / "images" / name / f"{i}.png")
            pixels[values.tobytes()] = name
    (tmp_path / "images" / "dog" / "notes.txt").write_text("not an image")
    split = image_folder(tmp_path / "images", size=4, test_size=0.4, seed=0)
    assert split.label_names == ["cat", "dog"]
    assert split.train_images.shape == (6, 1, 4, 4) and split.test_images.shape == (4, 1, 4, 4)
    images = np.concatenate([split.train_images, split.test_images])
    labels = np.concatenate([split.train_labels, split.test_labels])
    for array, label in zip(images, labels, strict=True):
        # Same size: no resampling, so every pixel is its byte over 255.
        key = np.rint(array[0] * 255).astype(np.uint8).tobytes()
        assert pixels[key] == split.label_names[label]
    rgb = image_folder(tmp_path / "images", size=2, channels=3, test_size=0.4)
    assert rgb.train_images.shape == (6, 3, 2, 2)
    assert rgb.train_images.min() >= 0 and rgb.train_images.max() <= 1
    (tmp_path / "images" / "dog" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match=r"broken\.png is not a readable image"):
        image_folder(tmp_path / "images", size=4)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="1 class subfolder"):
        image_folder(tmp_path / "one")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name)
    )
    with pytest.raises(DataError, match="pip install pillow"):
        image_folder(tmp_path / "images")


def test_the_command_line_gives_a_bare_encoder_a_head_for_the_user_labels(capsys, tmp_path):
    folder = save_tiny(tiny_bert(), tmp_path / "bert", tiny_tokenizer())
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _labelled_rows(10)))
    out = tmp_path / "kd"
    code = main(["--quiet", "compress", str(folder), "--method", "rmt-kd", "--calibration-data",
                 str(path), "--text-column", "body", "--label-column", "topic",
                 "--steps-per-cut", "1", "--sites", "mlp", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    model, _ = laserrmt.load(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2
    code = main(["--quiet", "compress", str(folder), "--method", "rmt-kd", "--calibration-data",
                 str(path), "--text-column", "body", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "no column 'label'" in _one_error_line(capsys.readouterr().err)


def test_calibration_data_that_nothing_would_read_is_refused(capsys, tmp_path):
    from laserrmt.errors import InvalidOptionError

    path = _write(tmp_path, "text")
    with pytest.raises(InvalidOptionError, match="oneshot selection reads no calibration"):
        compress(tiny_llama(), tiny_tokenizer(), calibration_data=path, progress=False)
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    code = main(["--quiet", "analyze", str(folder), "--calibration-data", str(path), "--out",
                 str(tmp_path / "a")])  # fmt: skip
    assert code == 2
    assert "--whiten and --activations only" in _one_error_line(capsys.readouterr().err)


def test_calibration_data_beside_a_plan_without_healing_is_refused(capsys, tmp_path):
    path = _write(tmp_path, "text")
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    code = main(["--quiet", "compress", str(folder), "--method", "budget", "--target-params",
                 "0.2", "--plan", str(plan), "--calibration-data", str(path), "--out",
                 str(tmp_path / "c")])  # fmt: skip
    assert code == 2
    assert "drop --calibration-data" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()
