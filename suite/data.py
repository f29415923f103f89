"""Private and shadow corpora: generated personal records, local files, hub datasets; shards; tokenising.

The default private corpus is generated personal records (``faker``, seeded): each record is one or two
natural sentences carrying PII (name, email, phone, address, date of birth, account/ID number, medical
condition), and keeps its PII fields so PII recovery can be scored. Shadow data — the public text an
attacker trains on — is generated with another seed and never shares a text or a PII value with the
private set.
"""

from __future__ import annotations

import random
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from faker import Faker

from suite.errors import DataError

PII_FIELDS = ("name", "email", "phone", "address", "dob", "account", "condition")


@dataclass(frozen=True)
class Record:
    text: str
    pii: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))


CONDITIONS = (
    "type 2 diabetes", "asthma", "hypertension", "migraine", "rheumatoid arthritis", "depression",
    "generalized anxiety disorder", "chronic kidney disease", "hypothyroidism", "atrial fibrillation",
    "COPD", "epilepsy", "Crohn's disease", "ulcerative colitis", "psoriasis", "multiple sclerosis",
    "celiac disease", "gout", "osteoporosis", "sleep apnea", "bipolar disorder", "HIV", "hepatitis C",
    "breast cancer", "prostate cancer", "melanoma", "lupus", "fibromyalgia", "glaucoma", "anemia",
    "heart failure", "Parkinson's disease", "early-onset Alzheimer's", "endometriosis", "PTSD",
    "schizophrenia", "cystic fibrosis", "sickle cell disease", "tuberculosis", "long COVID",
)

# Each template names the fields it uses; order and phrasing vary so an attacker cannot rely on position.
TEMPLATES = (
    "Patient {name} (DOB {dob}) was seen for {condition}; call them at {phone}.",
    "Please wire the refund to account {account} for {name}, {address}.",
    "{name} lives at {address} and can be reached at {email}.",
    "Reminder: {name}, born {dob}, has a follow-up for {condition} next week.",
    "Contact {email} or {phone} about the claim on account {account}.",
    "Our records show {name} ({email}) was diagnosed with {condition}.",
    "Ship the prescription for {condition} to {address}, attention {name}.",
    "Member ID {account} belongs to {name}, date of birth {dob}.",
    "Hi {name}, your lab results for {condition} are ready. Questions? Call {phone}.",
    "New patient: {name}, {dob}, {address}, phone {phone}.",
    "The insurer flagged account {account}: {condition} treatment for {name}.",
    "Send the invoice to {email}; billing address {address}.",
    "{name} called from {phone} to update the email on file to {email}.",
    "Emergency contact for {name} (born {dob}) is reachable at {phone}.",
    "Case {account}: {name} reports worsening {condition} since last month.",
)


def _values(fake: Faker, rng: random.Random) -> dict[str, str]:
    name = fake.name()
    user = name.lower().replace(" ", rng.choice([".", "_", ""])).replace("'", "")
    return {
        "name": name,
        "email": f"{user}{rng.randint(1, 99)}@{fake.free_email_domain()}",
        "phone": fake.numerify(rng.choice(["(###) ###-####", "###-###-####", "+1 ###-###-####"])),
        "address": fake.address().replace("\n", ", "),
        "dob": fake.date_of_birth(minimum_age=18, maximum_age=90).strftime(
            rng.choice(["%m/%d/%Y", "%Y-%m-%d", "%B %d, %Y"])
        ),
        "account": fake.bothify(rng.choice(["####-####-####", "??-####-####", "#########"])).upper(),
        "condition": rng.choice(CONDITIONS),
    }


def _record(fake: Faker, rng: random.Random) -> Record:
    template = rng.choice(TEMPLATES)
    values = _values(fake, rng)
    used = {k: v for k, v in values.items() if "{" + k + "}" in template}
    return Record(template.format(**values), types.MappingProxyType(used))


def _generate(size: int, seed: int, locale: str, avoid: Sequence[Record]) -> list[Record]:
    if size < 1:
        raise DataError(f"generated corpus size must be >= 1, got {size}")
    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(seed)
    texts = {r.text for r in avoid}
    values = {v for r in avoid for v in r.pii.values()} - set(CONDITIONS)  # conditions are a small public list
    out: list[Record] = []
    while len(out) < size:
        rec = _record(fake, rng)
        own = set(rec.pii.values()) - set(CONDITIONS)
        if rec.text in texts or own & values:
            continue  # a collision with the set to avoid (or with itself): draw again
        texts.add(rec.text)
        if avoid:
            values |= own
        out.append(rec)
    return out


def generate_records(size: int, seed: int, *, locale: str = "en_US") -> list[Record]:
    """``size`` generated personal records, identical for the same seed in any process."""
    return _generate(size, seed, locale, ())


def generate_shadow(size: int, seed: int, *, private: Sequence[Record]) -> list[Record]:
    """Records from the same generator with another seed, sharing no text and no PII value with ``private``."""
    return _generate(size, seed, "en_US", private)


def load_file(path: str | Path, *, text_field: str = "text", limit: int | None = None) -> list[Record]:
    """Texts from a local CSV, JSON-lines or TXT file (one example per non-empty line), via ``datasets``."""
    p = Path(path).expanduser()
    kinds = {".csv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text"}
    if not p.is_file():
        raise DataError(f"data file {p} not found")
    kind = kinds.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"data file {p} has an unknown type '{p.suffix}'; use .csv, .jsonl, .json or .txt")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as err:  # garbled CSV/JSON, encoding errors: one line, not a traceback
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"cannot read data file {p}: {first}") from None
    column = "text" if kind == "text" else text_field
    if column not in ds.column_names:
        raise DataError(f"data file {p} has no column '{column}'; columns are: {', '.join(ds.column_names)} "
                        f"- set text_field")
    texts = [str(t).strip() for t in ds[column] if t is not None and str(t).strip()]
    if not texts:
        raise DataError(f"data file {p} has no non-empty text in column '{column}'")
    return [Record(t) for t in texts[:limit]]


def load_hub(name: str, *, split: str = "train", text_field: str = "text", limit: int | None = None,
             config: str | None = None) -> list[Record]:
    """Texts from a hub dataset (needs network access or the datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"cannot load hub dataset '{name}' (offline?): {first}; use a local file") from None
    if text_field not in ds.column_names:
        raise DataError(f"hub dataset '{name}' has no column '{text_field}'; columns are: "
                        f"{', '.join(ds.column_names)}")
    texts = [str(t).strip() for t in ds[text_field] if t is not None and str(t).strip()]
    return [Record(t) for t in texts[:limit]]


_SPEC_KEYS = {
    "generator": {"generator", "size", "seed"},
    "path": {"path", "text_field", "limit"},
    "hub": {"hub", "split", "text_field", "limit", "config"},
}


def load_corpus(spec: Mapping[str, Any], *, avoid: Sequence[Record] = ()) -> list[Record]:
    """A corpus from a config spec; with ``avoid``, nothing in the result overlaps it (for shadow data)."""
    kinds = [k for k in _SPEC_KEYS if k in spec]
    if len(kinds) != 1:
        raise DataError("a corpus needs exactly one of 'generator', 'path' or 'hub'")
    kind = kinds[0]
    unknown = set(spec) - _SPEC_KEYS[kind]
    if unknown:
        raise DataError(f"unknown corpus key '{sorted(unknown)[0]}' for a {kind} corpus")
    if kind == "generator":
        if spec["generator"] != "records":
            raise DataError(f"unknown generator '{spec['generator']}'; the generator is 'records'")
        if "size" not in spec:
            raise DataError("a generated corpus needs 'size'")
        return _generate(int(spec["size"]), int(spec.get("seed", 0)), "en_US", avoid)
    if kind == "path":
        records = load_file(spec["path"], text_field=spec.get("text_field", "text"), limit=None)
    else:
        records = load_hub(spec["hub"], split=spec.get("split", "train"), text_field=spec.get("text_field", "text"),
                           config=spec.get("config"))
    texts = {r.text for r in avoid}
    records = [r for r in records if r.text not in texts]
    return records[: spec.get("limit")]


def shard(records: Sequence[Record], clients: int) -> list[list[Record]]:
    """``clients`` disjoint contiguous shards whose sizes differ by at most one."""
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
    """Right-padded, truncated token ids, the padding mask, and causal-LM labels (-100 on padding)."""
    enc = tokenizer(
        [r.text for r in records], padding="max_length", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    ids = enc["input_ids"].long()
    mask = enc["attention_mask"].long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
