"""Loading models: tiny test models per family, local directories, clear errors, the embedded default."""

import pytest
import torch

from suite.errors import ModelError
from suite.models import DEFAULT_MODEL, TINY_FAMILIES, cache_dir, load_model, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_build_run_and_are_deterministic(family):
    a, b = tiny_model(family, seed=3), tiny_model(family, seed=3)
    c = tiny_model(family, seed=4)
    ids = a.tokenizer("Call 555-0199 or mail jo@x.org", return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb, lc = (m.model(input_ids=ids).logits for m in (a, b, c))
    assert la.shape == (1, ids.shape[1], a.model.config.vocab_size)
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert a.model.config.use_cache is False and a.model.dtype == torch.float32


def test_tiny_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    text = "Zoë's e-mail: zoe@example.org, tel. +44 20 7946 0958 — DOB 1990-02-28 ✓"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"


def test_local_directory_loads_with_same_logits(tmp_path):
    tiny = tiny_model("gpt2")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    assert loaded.revision.startswith("dir-") and loaded.revision == load_model(str(tmp_path)).revision
    assert loaded.tokenizer.pad_token is not None


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("./no/such/model", "no such model"),
        ("/definitely/missing.gguf", "no such GGUF"),
        ("not-a-real-org/not-a-real-model-xyz", "not a local directory"),
    ],
)
def test_unknown_model_is_one_line_error(name, match, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelError, match=match) as err:
        load_model(name)
    assert "\n" not in str(err.value)


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_tiny_family():
    with pytest.raises(ModelError, match="llama"):
        tiny_model("bert")


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPLITLEAK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "splitleak"


@pytest.mark.slow
def test_default_model_is_smollm2_and_generates_sensibly():
    loaded = load_model(DEFAULT_MODEL)  # converts once (~30 s), then comes from the cache
    cfg = loaded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    tok = loaded.tokenizer
    ids = tok("My name is John and my email is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "@" in tok.decode(out[0, ids.input_ids.shape[1]:])

    messages: list[str] = []
    again = load_model(DEFAULT_MODEL, progress=messages.append)
    assert messages == []  # came from the fp32 cache: no fetch, no conversion
    with torch.no_grad():
        torch.testing.assert_close(again.model(**ids).logits, loaded.model(**ids).logits, rtol=0, atol=0)
