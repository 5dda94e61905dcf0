"""The command line: outputs, and one clear line with a non-zero exit for every user error."""

from __future__ import annotations

import json

import pytest
import torch

from laserrmt.cli import main
from tests.test_analyze import plant_low_rank
from tests.tiny_models import save_tiny, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(plant_low_rank(tiny_llama(tie_word_embeddings=False)), folder, tiny_tokenizer())
    return folder


def run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("laserrmt: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in err


def test_analyze_writes_the_report(capsys, tiny_folder, tmp_path):
    code, out, _ = run(capsys, "analyze", tiny_folder, "--out", tmp_path / "a")
    assert code == 0
    assert "14 matrices" in out and "report:" in out
    assert (tmp_path / "a" / "report.html").exists()
    records = json.loads((tmp_path / "a" / "spectra.json").read_text())
    assert {r["rank_kept"] for r in records} == {3}


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["analyze", "{missing}", "--out", "{out}"], ["no such file or folder"]),
        (
            ["analyze", "{folder}", "--out", "{out}", "--threshold", "magic"],
            ["unknown --threshold", "mp"],
        ),
        (["analyze", "{folder}", "--out", "{out}", "--threshold", "fixed"], ["--fraction"]),
        (
            ["analyze", "{folder}", "--out", "{out}", "--targets", "nothing_like_this"],
            ["nothing_like_this"],
        ),
        (["compress", "{folder}", "--out", "{out}", "--mode", "shrink"], ["unknown --mode"]),
        (["compress", "{folder}", "--out", "{out}", "--target-params", "1.5"], ["--target-params"]),
        (["compress", "{folder}", "--out", "{out}", "--sparse-share", "0.95"], ["--sparse-share"]),
        (["compress", "{folder}", "--out", "{out}", "--plan", "{missing}"], []),
        (["compress", "{folder}", "--out", "{out}", "--target-size", "lots"], ["not a size", "MB"]),
        (
            ["compress", "{folder}", "--out", "{out}", "--max-shard-size", "0MB"],
            ["--max-shard-size '0MB'", "positive"],
        ),
    ],
)
def test_user_errors_are_one_line(capsys, tiny_folder, tmp_path, argv, fragments):
    values = {"missing": tmp_path / "missing", "out": tmp_path / "out", "folder": tiny_folder}
    code, _, err = run(capsys, *[a.format(**values) for a in argv])
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--mode", "shrink"),
        ("--score", "size"),
        ("--objective", "bleu"),
        ("--threshold", "magic"),
        ("--estimator", "guess"),
        ("--whiten", "pca"),
        ("--allocation", "greedy"),
        ("--importance", "vibes"),
    ],
)
def test_a_bad_choice_is_refused_before_the_model_is_loaded(
    capsys, monkeypatch, tiny_folder, tmp_path, option, value
):
    import laserrmt.cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(laserrmt.cli, "_load_placed", no_loading)
    code, _, err = run(capsys, "compress", tiny_folder, "--out", tmp_path / "out", option, value)
    assert_one_line_error(code, err, f"unknown {option} {value!r}", "choose one of")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
        (["--kd-estimator", "guess"], "estimator='guess'"),
        (["--tau", "1.5"], "tau=1.5"),
    ],
)
def test_a_bad_rmt_kd_option_is_refused_before_the_model_is_loaded(
    capsys, monkeypatch, tiny_folder, tmp_path, argv, fragment
):
    import laserrmt.cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(laserrmt.cli, "_load_placed", no_loading)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", tiny_folder, "--method", "rmt-kd", "--out", out, *argv)
    assert_one_line_error(code, err, fragment)


def test_existing_output_is_refused(capsys, tiny_folder, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "analyze", tiny_folder, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--overwrite")


def test_nan_weights_name_the_module(capsys, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.v_proj").weight[1, 2] = float("inf")
    folder = save_tiny(model, tmp_path / "broken", tiny_tokenizer())
    code, _, err = run(capsys, "analyze", folder, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "model.layers.0.self_attn.v_proj")
    # The other matrices were analysed and the report written all the same.
    records = json.loads((tmp_path / "out" / "spectra.json").read_text())
    assert len(records) == 13


def test_compress_saves_a_smaller_model_that_loads_back(capsys, tiny_folder, tmp_path):
    import laserrmt

    out = tmp_path / "c"
    code, stdout, err = run(
        capsys,
        "compress",
        tiny_folder,
        "--out",
        out,
        "--eval-windows",
        "2",
        "--latency-repeats",
        "1",
    )
    assert code == 0, err
    assert "perplexity" in stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["after"]["params_total"] < evaluation["before"]["params_total"]
    assert evaluation["after"]["size_bytes"] < evaluation["before"]["size_bytes"]
    meta = json.loads((out / "laserrmt.json").read_text())
    assert meta["plan"]["method"] == "laser-oneshot"
    model, tokenizer = laserrmt.load(out)
    ids = torch.tensor([tokenizer.encode("the spectrum of a weight matrix")])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    html = (out / "report.html").read_text()
    assert "Before and after" in html and "Per-module decisions" in html


def test_evaluate_writes_json(capsys, tiny_folder, tmp_path):
    code, _, err = run(
        capsys,
        "evaluate",
        tiny_folder,
        "--eval-windows",
        "2",
        "--latency-repeats",
        "1",
        "--json",
        tmp_path / "e.json",
    )
    assert code == 0, err
    data = json.loads((tmp_path / "e.json").read_text())
    for key in (
        "perplexity",
        "eval_tokens",
        "params_total",
        "params_targets",
        "size_bytes",
        "prefill_ms",
        "decode_tokens_per_s",
    ):
        assert key in data
    assert data["eval_tokens"] == 2 * 511


def test_compress_rmt_kd_from_the_command_line(capsys, tiny_folder, tmp_path):
    import laserrmt

    out = tmp_path / "kd"
    code, stdout, err = run(
        capsys,
        "compress",
        tiny_folder,
        "--method",
        "rmt-kd",
        "--out",
        out,
        "--steps-per-cut",
        "2",
        "--no-eval",
    )
    assert code == 0, err
    assert "parameters:" in stdout and "fewer" in stdout
    report = json.loads((out / "evaluation.json").read_text())["rmt_kd"]
    assert report["records"] and report["parameters_after"] <= report["parameters_before"]
    model, tokenizer = laserrmt.load(out)
    ids = torch.tensor([tokenizer.encode("activation spectra")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_analyze_activations_reports_every_width_site(capsys, tiny_folder, tmp_path):
    out = tmp_path / "act"
    code, stdout, err = run(
        capsys, "analyze", tiny_folder, "--activations", "--calibration-windows", "2", "--out", out
    )
    assert code == 0, err
    assert "mlp" in stdout and (out / "report.html").exists()
    records = json.loads((out / "activations.json").read_text())["sites"]
    assert records and all(0 <= r["k"] <= r["d"] for r in records)


def test_low_bit_with_correction_from_the_command_line(capsys, tiny_folder, tmp_path):
    import laserrmt

    out = tmp_path / "q3"
    code, _, err = run(
        capsys,
        "compress",
        tiny_folder,
        "--target-params",
        "0.1",
        "--whiten",
        "svdllm",
        "--quantize",
        "int3",
        "--correct-rank",
        "rmt",
        "--calibration-windows",
        "2",
        "--eval-windows",
        "1",
        "--latency-repeats",
        "1",
        "--out",
        out,
    )
    assert code == 0, err
    meta = json.loads((out / "laserrmt.json").read_text())
    assert meta["settings"]["compress"]["settings"]["correct_rank"] == "rmt"
    types = {entry["type"] for entry in meta["modules"].values()}
    assert {"LowBitLinear", "LowBitLowRankLinear"} & types
    model, _ = laserrmt.load(out)
    assert any(type(m).__name__.startswith("LowBit") for m in model.modules())
    code, _, err = run(
        capsys, "compress", tiny_folder, "--quantize", "int7", "--out", tmp_path / "x"
    )
    assert_one_line_error(code, err, "int7")


def test_budget_heal_int8_from_the_command_line(capsys, tiny_folder, tmp_path):
    import laserrmt

    out = tmp_path / "b"
    code, _, err = run(
        capsys,
        "compress",
        tiny_folder,
        "--whiten",
        "svdllm",
        "--target-params",
        "0.2",
        "--heal-steps",
        "2",
        "--quantize",
        "int8",
        "--calibration-windows",
        "2",
        "--eval-windows",
        "1",
        "--latency-repeats",
        "1",
        "--out",
        out,
    )
    assert code == 0, err
    meta = json.loads((out / "laserrmt.json").read_text())
    assert meta["plan"]["method"] == "budget"
    compress_settings = meta["settings"]["compress"]["settings"]
    assert compress_settings["whiten"] == "svdllm" and compress_settings["quantize"] == "int8"
    assert meta["settings"]["compress"]["healing"]["steps"] == 2
    types = {entry["type"] for entry in meta["modules"].values()}
    assert "Int8LowRankLinear" in types
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["after"]["size_bytes"] < 0.5 * evaluation["before"]["size_bytes"]
    model, _ = laserrmt.load(out)
    assert any(type(m).__name__ == "Int8LowRankLinear" for m in model.modules())


@pytest.mark.slow
def test_rmt_kd_gives_a_bare_encoder_a_head_on_bbc_news(capsys, tmp_path):
    import laserrmt
    from tests.tiny_models import tiny_bert

    folder = save_tiny(tiny_bert(), tmp_path / "bert", tiny_tokenizer())
    out = tmp_path / "kd"
    code, stdout, err = run(
        capsys,
        "compress",
        folder,
        "--method",
        "rmt-kd",
        "--dataset",
        "bbc-news",
        "--steps-per-cut",
        "1",
        "--sites",
        "mlp",
        "--out",
        out,
    )
    assert code == 0, err
    assert "fewer" in stdout
    model, _ = laserrmt.load(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 5


def test_a_size_budget_from_the_command_line(capsys, tiny_folder, tmp_path):
    import laserrmt
    from laserrmt.models.loading import load_model
    from laserrmt.surgery.io import weight_bytes

    target = int(0.4 * weight_bytes(load_model(tiny_folder).model))  # int8 alone: ~0.5
    out = tmp_path / "s"
    code, stdout, err = run(
        capsys,
        "compress",
        tiny_folder,
        "--target-size",
        str(target),
        "--quantize",
        "int8",
        "--calibration-windows",
        "2",
        "--no-eval",
        "--out",
        out,
    )
    assert code == 0, err
    meta = json.loads((out / "laserrmt.json").read_text())
    assert meta["plan"]["method"] == "budget"
    achieved = meta["settings"]["compress"]["weight_bytes"]
    assert achieved <= target and f"weights: {achieved:,} bytes" in stdout
    model, _ = laserrmt.load(out)
    assert weight_bytes(model) == achieved


def test_compress_writes_shards_of_the_asked_size(capsys, tiny_folder, tmp_path):
    import laserrmt

    out = tmp_path / "sharded"
    code, _, err = run(
        capsys, "compress", tiny_folder, "--max-shard-size", "40kB", "--no-eval", "--out", out
    )
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # 40,000 bytes and a header at most, or one larger tensor alone
        tensors = [k for k, f in index["weight_map"].items() if f == shard.name]
        assert shard.stat().st_size < 40_000 + 4096 or len(tensors) == 1
    model, _ = laserrmt.load(out)
    assert sum(p.numel() for p in model.parameters()) * 4 == index["metadata"]["total_size"]


# ---------------------------------------------------------------------------------------------
# Usage errors, --version, -q/-v anywhere


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            ["compress", "m", "--out", "o", "--eval-windows", "abc"],
            ["--eval-windows", "int", "abc"],
        ),
        (["analyze", "m", "--out", "o", "--alpha", "often"], ["--alpha", "float", "often"]),
        (["-q", "analyze", "m", "--out", "o", "--tau"], ["--tau", "expected one argument"]),
        (["analyze", "m"], ["required", "--out"]),
        (["evaluate", "m", "--frobnicate"], ["unrecognized", "--frobnicate"]),
        (["compres", "m"], ["invalid choice", "'compres'", "analyze", "compress", "evaluate"]),
        ([], ["required", "analyze,compress,evaluate"]),
        (["analyze", "m", "--out", "o", "-q", "-v"], ["--verbose", "--quiet"]),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(capsys, argv, fragments):
    code = _exit_status(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("laserrmt: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_the_installed_command_prints_one_line(tmp_path):
    import os
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-m", "laserrmt.cli", "compress", "--out", "o", "--eval-windows", "abc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
    )
    assert child.returncode == 2 and child.stdout == ""
    assert child.stderr.strip().splitlines() == [
        "laserrmt: error: argument --eval-windows: invalid int value: 'abc' "
        "(see laserrmt compress --help)"
    ]


def test_version(capsys):
    import laserrmt

    assert _exit_status(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"laserrmt {laserrmt.__version__}"


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["analyze", "--out", "d"], False, False),
        (["-q", "analyze", "--out", "d"], True, False),
        (["analyze", "--out", "d", "-q"], True, False),
        (["analyze", "--quiet", "--out", "d"], True, False),
        (["--verbose", "compress", "--out", "d"], False, True),
        (["compress", "--out", "d", "-v"], False, True),
        (["evaluate", "m", "--verbose"], False, True),
    ],
)
def test_quiet_and_verbose_before_or_after_the_command(argv, quiet, verbose):
    from laserrmt.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def _options_named_in_messages() -> dict[str, set[str]]:
    """Every ``--option`` written in a string literal of laserrmt's code: option → files.

    Options of other programs (``pip install --no-deps``) are left out.
    """
    import ast
    import re
    from pathlib import Path

    import laserrmt

    option = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
    foreign = re.compile(r"\bpip install(\s+--[a-z][a-z0-9-]*)*")
    found: dict[str, set[str]] = {}
    for file in Path(laserrmt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in option.findall(foreign.sub("", node.value)):
                    found.setdefault(f"--{name}", set()).add(file.name)
    return found


def test_every_option_a_message_names_exists():
    from laserrmt.cli import build_parser

    parser = build_parser()
    defined = set(parser._option_string_actions)
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if isinstance(sub, type(parser)):
                defined |= set(sub._option_string_actions)
    mentioned = _options_named_in_messages()
    assert "--target-size" in mentioned and "--task" not in defined  # the scan sees messages
    unknown = {name: sorted(files) for name, files in mentioned.items() if name not in defined}
    assert not unknown, f"messages name options the command line does not have: {unknown}"
