"""`laserrmt compress --method rmt-kd --images DIR`: RMT-KD on a user's ImageFolder directory.

The model is a tiny transformers ViT image classifier saved as a folder (no torchvision);
the images are small PNGs generated in the test with a planted class signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import laserrmt
from laserrmt.cli import main
from laserrmt.data.classification import ImageSplit, image_batches

Image = pytest.importorskip("PIL.Image")


def _vit(folder: Path, num_labels: int = 2) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    return folder


def _png_folder(root: Path, classes: dict[str, int], per_class: int = 20) -> Path:
    """Grey 8×8 PNGs: each class a different mean brightness plus noise (seeded)."""
    rng = np.random.default_rng(0)
    for name, level in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:02d}.png")
    return root


def _compress(model: Path, images: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "compress",
            str(model),
            "--method",
            "rmt-kd",
            "--images",
            str(images),
            "--steps-per-cut",
            "0",
            "--tolerance",
            "100",
            "--floor",
            "0",
            "--out",
            str(out),
            "-q",
            *extra,
        ]
    )


def test_rmt_kd_on_an_image_folder_from_the_cli(tmp_path: Path) -> None:
    model = _vit(tmp_path / "vit")
    images = _png_folder(tmp_path / "images", {"bright": 200, "dark": 50})
    out = tmp_path / "kd"
    assert _compress(model, images, out) == 0
    settings = json.loads((out / "width_plan.json").read_text())
    recipe = settings["calibration"]["recipe"]
    assert recipe["dataset"] == "image folder"
    assert recipe["images"] == {
        "path": str(images),
        "size": 8,
        "channels": 1,
        "mean": None,
        "std": None,
    }
    result = json.loads((out / "evaluation.json").read_text())["rmt_kd"]
    assert result["settings"]["label_names"] == ["bright", "dark"]
    assert result["parameters_after"] < result["parameters_before"]
    compressed, tokenizer = laserrmt.load(out)
    assert tokenizer is None
    assert sum(p.numel() for p in compressed.parameters()) == result["parameters_after"]
    # The plan replays on the original folder from the recorded image folder alone.
    replay = tmp_path / "replay"
    argv = ["compress", str(model), "--plan", str(out / "width_plan.json"), "--out", str(replay)]
    assert main([*argv, "-q"]) == 0
    replayed, _ = laserrmt.load(replay)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(replayed(x).logits, compressed(x).logits, rtol=0, atol=1e-6)


def test_image_batches_normalise_with_the_processor_statistics() -> None:
    pixels = np.full((10, 3, 2, 2), 0.5, np.float32)
    pixels[:, 1] = 0.25
    labels = np.array([0, 1] * 5)
    split = ImageSplit(pixels, labels, pixels[:2], labels[:2], ["a", "b"])
    batches = image_batches(
        split, batch_size=4, validation_fraction=0.2, mean=[0.5, 0.5, 0.0], std=[0.5, 0.25, 2.0]
    )
    x, y = batches.train[0]
    assert x.shape == (4, 3, 2, 2) and y.dtype == torch.int64
    # (0.5 − 0.5) / 0.5, (0.25 − 0.5) / 0.25, (0.5 − 0) / 2
    assert torch.equal(x[0, :, 0, 0], torch.tensor([0.0, -1.0, 0.25]))
    assert sum(len(b[1]) for b in batches.train) == 8
    assert sum(len(b[1]) for b in batches.validation) == 2


def test_processor_statistics_are_read_beside_the_model(tmp_path: Path) -> None:
    from laserrmt.data.classification import ImageFolderData

    model = _vit(tmp_path / "vit")
    (model / "preprocessor_config.json").write_text(
        json.dumps({"do_normalize": True, "image_mean": [0.4], "image_std": [0.2]})
    )
    from laserrmt.models.loading import load_model

    loaded = load_model(model)
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    data = ImageFolderData.for_model(tmp_path / "images", loaded.model, model_folder=model)
    assert (data.channels, data.size, data.mean, data.std) == (1, 8, [0.4], [0.2])
    assert ImageFolderData.for_model("x", loaded.model, size=16).size == 16


def _one_line(argv_result: int, capsys: pytest.CaptureFixture[str]) -> str:
    """The error, which must be the last line on stderr and a single line (transformers' own
    progress bars may come before it)."""
    assert argv_result == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("laserrmt: error: ")
    assert sum("error" in line for line in lines) == 1
    return lines[-1]


def test_bad_image_folders_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _vit(tmp_path / "vit")
    out = tmp_path / "kd"
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line(_compress(model, empty, out), capsys)
    assert "has 0 class subfolder(s); a classifier needs 2" in err
    one = _png_folder(tmp_path / "one", {"only": 100})
    assert "has 1 class subfolder(s)" in _one_line(_compress(model, one, out), capsys)
    broken = _png_folder(tmp_path / "broken", {"a": 50, "b": 200})
    (broken / "b" / "99.png").write_bytes(b"not a png")
    err = _one_line(_compress(model, broken, out), capsys)
    assert "99.png is not a readable image" in err
    three = _png_folder(tmp_path / "three", {"a": 30, "b": 120, "c": 220})
    err = _one_line(_compress(model, three, out), capsys)
    assert "the data has 3 labels (a, b, c) and the classifier 2 outputs" in err
    assert not out.exists()


def test_images_need_an_image_classifier_and_rmt_kd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.tiny_models import tiny_llama, tiny_tokenizer

    llama = tmp_path / "llama"
    tiny_llama().save_pretrained(llama)
    tiny_tokenizer().save_pretrained(llama)
    images = _png_folder(tmp_path / "images", {"a": 50, "b": 200}, per_class=5)
    out = tmp_path / "kd"
    err = _one_line(_compress(llama, images, out), capsys)
    assert "--images needs an image classifier" in err and "LlamaForCausalLM" in err
    argv = ["compress", str(llama), "--images", str(images), "--out", str(out)]
    assert "read by --method rmt-kd only" in _one_line(main(argv), capsys)
    err = _one_line(_compress(llama, images, out, "--dataset", "bbc-news"), capsys)
    assert "drop --calibration-data and --dataset" in err
    assert not out.exists()
