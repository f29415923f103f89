"""Private and shadow corpora: generated personal records, local files, hub datasets; shards; tokenising.

The default private corpus is generated personal records (``faker``, seeded): each record is one or two
natural sentences carrying PII (name, email, phone, address, date of birth, account/ID number, medical
condition) and keeps its PII values, so PII recovery can be scored against the exact strings in the text.
Shadow data — the public text an attacker trains on — is generated with another seed and contains no private
text and no private PII value, so anything an attack recovers came through the split, not the shadow set.
"""

from __future__ import annotations

import random
import re
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faker import Faker

from suite.errors import DataError

if TYPE_CHECKING:  # torch is slow to import and only tokenize's callers need it
    import torch

PII_FIELDS = ("name", "email", "phone", "address", "dob", "account", "condition")


@dataclass(frozen=True)
class Record:
    """One example. ``pii`` maps a field to the exact string in ``text``; empty for file and hub data."""

    text: str
    pii: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        # Frozen all the way down: a record is ground truth for metrics, nothing may edit it in place.
        object.__setattr__(self, "pii", types.MappingProxyType(dict(self.pii)))

    def __hash__(self) -> int:  # MappingProxyType is unhashable; records go into sets and dict keys
        return hash((self.text, tuple(sorted(self.pii.items()))))


CONDITIONS = (
    "type 2 diabetes", "asthma", "hypertension", "migraine", "rheumatoid arthritis", "depression",
    "generalized anxiety disorder", "chronic kidney disease", "hypothyroidism", "atrial fibrillation",
    "COPD", "epilepsy", "Crohn's disease", "ulcerative colitis", "psoriasis", "multiple sclerosis",
    "celiac disease", "gout", "osteoporosis", "sleep apnea", "bipolar disorder", "HIV", "hepatitis C",
    "breast cancer", "prostate cancer", "melanoma", "lupus", "fibromyalgia", "glaucoma", "anemia",
    "heart failure", "Parkinson's disease", "early-onset Alzheimer's", "endometriosis", "PTSD",
    "schizophrenia", "cystic fibrosis", "sickle cell disease", "tuberculosis", "long COVID",
)

# Fields, their order and the phrasing vary, so an attack cannot rely on a PII value's position. Each
# template holds two or three fields and is kept short: tokenizers that split digits one by one (SmolLM2,
# Llama) spend 10-20 tokens on a phone, date or address, and the default max_length is 32. Measured with
# SmolLM2's tokenizer: median 25 tokens, ~93% within 32, none over 40; GPT-2's gives fewer.
TEMPLATES = (
    "Patient {name} (DOB {dob}) was seen for {condition}.",
    "Please wire the refund to account {account} for {name}.",
    "{name} moved to {address} last spring.",
    "Reminder: {name}, born {dob}, has a follow-up for {condition} next week.",
    "Contact {email} about the claim on account {account}.",
    "Our records show {name} ({email}) was diagnosed with {condition}.",
    "Ship the {condition} prescription to {address}, attention {name}.",
    "Member ID {account} belongs to {name}, date of birth {dob}.",
    "Hi {name}, your lab results for {condition} are ready. Questions? Call {phone}.",
    "New patient {name}, phone {phone}.",
    "The insurer flagged account {account}: {condition} treatment for {name}.",
    "Send the invoice for {name} to {email}.",
    "{name} called from {phone} about a billing error.",
    "Emergency contact for {name}: {phone}.",
    "Case {account}: {name} reports worsening {condition} since last month.",
    "We could not verify {name}. The date of birth {dob} does not match our records.",
    "{name} asked us to move the appointment. Email the new time to {email}.",
    "Lost card reported by {name}; a replacement goes to {address}.",
    "Please update the address for {name} to {address}.",
    "{email} asked for the {condition} records of {name}.",
    "Records for {name}, born {dob}: {condition}.",
    "Text {name} at {phone} once the {condition} results are in.",
)


def _us_values(fake: Faker, rng: random.Random) -> tuple[str, str, str]:
    """Name-independent US phone and single-line civilian address (faker's own may give military ones)."""
    phone = fake.numerify(rng.choice(["(%##) %##-####", "%##-%##-####"]))
    address = f"{fake.building_number()} {fake.street_name()}, {fake.city()}"
    if rng.random() < 0.5:
        address += f", {fake.state_abbr(include_territories=False)} {fake.zipcode()}"
    return phone, address, fake.free_email_domain()


def _values(fake: Faker, rng: random.Random, us: bool) -> dict[str, str]:
    first, last = fake.first_name(), fake.last_name()
    if us:
        phone, address, domain = _us_values(fake, rng)
    else:
        phone, address, domain = fake.phone_number(), fake.address().replace("\n", ", "), fake.free_email_domain()
    user = rng.choice([".", "_", ""]).join(re.sub(r"[^a-z]", "", s.lower()) or "x" for s in (first, last))
    return {
        "name": f"{first} {last}",
        "email": f"{user}{rng.randint(1, 99)}@{domain}",
        "phone": phone,
        "address": address,
        "dob": fake.date_of_birth(minimum_age=18, maximum_age=90).strftime(
            rng.choice(["%m/%d/%Y", "%Y-%m-%d", "%B %d, %Y"])
        ),
        "account": fake.bothify(rng.choice(["####-####-####", "??-######", "########"])).upper(),
        "condition": rng.choice(CONDITIONS),
    }


def _record(fake: Faker, rng: random.Random, us: bool) -> Record:
    template = rng.choice(TEMPLATES)
    values = _values(fake, rng, us)
    return Record(template.format(**values), {k: v for k, v in values.items() if "{" + k + "}" in template})


def _generate(size: int, seed: int, locale: str, avoid: Sequence[Record]) -> list[Record]:
    if size < 1:
        raise DataError(f"generated corpus size must be >= 1, got {size}")
    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(seed)
    us = locale == "en_US"
    texts = {r.text for r in avoid}
    # Conditions come from a short public list, so sharing one is not a leak; every other private value
    # must not occur anywhere in a new text (a substring check also catches e.g. a name inside an email).
    secrets = sorted({v for r in avoid for k, v in r.pii.items() if k != "condition"})
    out: list[Record] = []
    for _ in range(50 * size + 1000):
        rec = _record(fake, rng, us)
        if rec.text in texts or any(s in rec.text for s in secrets):
            continue  # a collision with the set to avoid (or a duplicate): draw again
        texts.add(rec.text)
        out.append(rec)
        if len(out) == size:
            return out
    raise DataError(f"cannot generate {size} records that avoid the private set; use a smaller size")


def generate_records(size: int, seed: int, *, locale: str = "en_US") -> list[Record]:
    """``size`` distinct generated personal records, identical for the same seed in any process."""
    return _generate(size, seed, locale, ())


def generate_shadow(size: int, seed: int, *, private: Sequence[Record]) -> list[Record]:
    """Records from the same templates with another seed, containing no text and no PII value of ``private``."""
    return _generate(size, seed, "en_US", private)


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause: ``datasets`` wraps the useful parser error in a generic one."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _texts(ds, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        raise DataError(f"{where} has no column '{column}'; columns are: {', '.join(ds.column_names)} "
                        "— set text_field")
    texts = [str(t).strip() for t in ds[column] if t is not None]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{where} has no non-empty text in column '{column}'; check the file or text_field")
    return texts


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a whole number >= 1, got {limit!r}")


def load_file(path: str | Path, *, text_field: str = "text", limit: int | None = None) -> list[Record]:
    """Texts from a local CSV, JSON-lines/JSON or TXT file (one example per line), in file order."""
    _check_limit(limit)
    p = Path(path).expanduser()
    kinds = {".csv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text"}
    if not p.is_file():
        raise DataError(f"data file {p} not found; check the path")
    kind = kinds.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"data file {p} has an unknown type '{p.suffix}'; use .csv, .jsonl, .json or .txt")
    import datasets  # slow to import; only file and hub corpora need it

    datasets.disable_progress_bars()
    # A throwaway cache: private text must not be copied into ~/.cache; keep_in_memory outlives the folder.
    try:
        with tempfile.TemporaryDirectory(prefix="splitleak-data-", ignore_cleanup_errors=True) as cache:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", keep_in_memory=True,
                                       cache_dir=cache)
    except Exception as err:  # garbled CSV/JSON, wrong encoding: one line, not a traceback
        raise DataError(f"cannot read data file {p} as {p.suffix[1:].upper()}: {_reason(err)}") from None
    texts = _texts(ds, "text" if kind == "text" else text_field, f"data file {p}")
    return [Record(t) for t in texts[:limit]]


def load_hub(name: str, *, split: str = "train", text_field: str = "text", limit: int | None = None,
             config: str | None = None) -> list[Record]:
    """Texts from a hub dataset; needs network access or the ``datasets`` cache."""
    _check_limit(limit)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise DataError(f"cannot load hub dataset '{name}' (offline?): {_reason(err)}; use a local file") from None
    texts = _texts(ds, text_field, f"hub dataset '{name}' (split '{split}')")
    return [Record(t) for t in texts[:limit]]


_SPEC_KEYS = {
    "generator": {"generator", "size", "seed"},
    "path": {"path", "text_field", "limit"},
    "hub": {"hub", "split", "text_field", "limit", "config"},
}


def load_corpus(spec: Mapping[str, Any], *, avoid: Sequence[Record] = ()) -> list[Record]:
    """A corpus from a config spec; nothing in it overlaps ``avoid`` (the private set, when loading shadow data)."""
    kinds = [k for k in _SPEC_KEYS if k in spec]
    if len(kinds) != 1:
        raise DataError("a corpus needs exactly one of 'generator', 'path' or 'hub'")
    kind = kinds[0]
    unknown = sorted(set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise DataError(f"unknown corpus key '{unknown[0]}' for a {kind} corpus; "
                        f"allowed: {', '.join(sorted(_SPEC_KEYS[kind]))}")
    if kind == "generator":
        if spec["generator"] != "records":
            raise DataError(f"unknown generator '{spec['generator']}'; the generator is 'records'")
        if "size" not in spec:
            raise DataError("a generated corpus needs 'size'")
        if not all(isinstance(spec.get(k, 0), int) for k in ("size", "seed")):
            raise DataError("corpus 'size' and 'seed' must be whole numbers")
        return _generate(spec["size"], spec.get("seed", 0), "en_US", avoid)
    limit = spec.get("limit")
    _check_limit(limit)
    if kind == "path":
        records = load_file(spec["path"], text_field=spec.get("text_field", "text"))
    else:
        records = load_hub(spec["hub"], split=spec.get("split", "train"), text_field=spec.get("text_field", "text"),
                           config=spec.get("config"))
    # Limit after filtering, so a shadow file that overlaps the private set still yields `limit` records.
    texts = {r.text for r in avoid}
    kept = [r for r in records if r.text not in texts]
    if not kept:
        raise DataError(f"every text in corpus '{spec[kind]}' is also in the private set; use different data")
    return kept[:limit]


def load_private(spec: Mapping[str, Any], held_out: int) -> tuple[list[Record], list[Record]]:
    """The private corpus and ``held_out`` more records of the same kind for measuring utility, disjoint
    from it (no shared text). Generated corpora generate the extra records after the private ones (the
    private records are the same as without a held-out set); files and hub datasets take the held-out
    records from the texts after the private ones (after ``limit``, or the last ``held_out`` texts)."""
    if held_out < 1:
        raise DataError(f"data.held_out must be >= 1, got {held_out}")
    kinds = [k for k in _SPEC_KEYS if k in spec]
    if kinds == ["generator"]:
        size = spec.get("size")
        if isinstance(size, int) and size >= 1:
            everything = load_corpus({**spec, "size": size + held_out})
            return everything[:size], everything[size:]
        return load_corpus(spec), []  # load_corpus raises the one-line error for the bad size
    limit = spec.get("limit")
    everything = load_corpus({k: v for k, v in spec.items() if k != "limit"})
    private = everything[:limit] if limit is not None else everything[: max(0, len(everything) - held_out)]
    texts = {r.text for r in private}
    rest = [r for r in everything[len(private):] if r.text not in texts]
    if len(rest) < held_out or not private:
        source = spec.get("path") or spec.get("hub")
        fix = "lower data.private.limit" if limit is not None else "use a larger file"
        raise DataError(f"corpus '{source}' has {len(everything)} texts: too few for {len(private) or 'any'} private "
                        f"records plus {held_out} held-out ones for utility; {fix} or lower data.held_out")
    return private, rest[:held_out]


def shard(records: Sequence[Record], clients: int) -> list[list[Record]]:
    """``clients`` disjoint contiguous shards whose sizes differ by at most one (earlier shards get the extra)."""
    if clients < 1:
        raise DataError(f"need at least one client, got {clients}")
    if clients > len(records):
        raise DataError(f"{len(records)} records cannot give {clients} clients a shard each; "
                        "use more records or fewer clients")
    base, extra = divmod(len(records), clients)
    out, lo = [], 0
    for i in range(clients):
        hi = lo + base + (1 if i < extra else 0)
        out.append(list(records[lo:hi]))
        lo = hi
    return out


def tokenize(records: Sequence[Record], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated token ids, the padding mask, and causal-LM labels (-100 on padding).

    Padding is forced to the right whatever the tokenizer's default, so position i means the same token
    position in every row; labels are masked by the attention mask, not by the pad id, which may equal EOS.
    """
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    enc = tokenizer(
        [r.text for r in records], padding="max_length", truncation=True, max_length=max_length,
        padding_side="right", return_tensors="pt",
    )
    ids = enc["input_ids"].long()
    mask = enc["attention_mask"].long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
