"""Private and shadow corpora, local files, shards and tokenising."""

import json
import re

import pytest

from suite.data import (
    PII_FIELDS,
    generate_records,
    generate_shadow,
    load_corpus,
    load_file,
    load_hub,
    shard,
    tokenize,
)
from suite.errors import DataError
from suite.models import tiny_tokenizer


def test_generated_records_are_deterministic_per_seed():
    assert generate_records(30, 5) == generate_records(30, 5)
    assert [r.text for r in generate_records(30, 5)] != [r.text for r in generate_records(30, 6)]


def test_pii_values_appear_verbatim_and_every_field_is_covered():
    records = generate_records(200, 1)
    seen = set()
    for r in records:
        assert r.pii, r.text
        for field, value in r.pii.items():
            assert field in PII_FIELDS and value in r.text
            seen.add(field)
    assert seen == set(PII_FIELDS)


def test_templates_vary():
    records = generate_records(200, 1)
    skeletons = set()
    for r in records:
        s = r.text
        for value in sorted(r.pii.values(), key=len, reverse=True):
            s = s.replace(value, "#")
        skeletons.add(re.sub(r"\s+", " ", s))
    assert len(skeletons) >= 10


@pytest.mark.parametrize("size", [64, 512])
def test_shadow_never_overlaps_private(size):
    private = generate_records(size, 1)
    shadow = generate_shadow(size, 2, private=private)
    assert len(shadow) == size
    assert not {r.text for r in private} & {r.text for r in shadow}
    values = {v for r in private for k, v in r.pii.items() if k != "condition"}
    assert not values & {v for r in shadow for k, v in r.pii.items() if k != "condition"}
    spec_shadow = load_corpus({"generator": "records", "size": size, "seed": 2}, avoid=private)
    assert spec_shadow == shadow


def test_local_files_load(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("body,stars\nGreat food,5\n  ,3\nTerrible service,1\nFine,3\n")
    assert [r.text for r in load_file(csv, text_field="body")] == ["Great food", "Terrible service", "Fine"]
    assert len(load_file(csv, text_field="body", limit=2)) == 2
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c d"])))
    assert [r.text for r in load_file(jsonl)] == ["a b", "c d"]
    txt = tmp_path / "r.txt"
    txt.write_text("one line\n\nanother line\n")
    assert [r.text for r in load_corpus({"path": str(txt)})] == ["one line", "another line"]
    assert load_file(txt)[0].pii == {}


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "needle"),
    [
        ("missing.csv", None, {}, "not found"),
        ("r.csv", "body\nhello\n", {"text_field": "txt"}, "no column 'txt'; columns are: body"),
        ("r.parquet2", "x", {}, "unknown type"),
        ("r.jsonl", '{"text": "a"}\n{broken', {}, "cannot read data file"),
        ("r.csv", "text,n\n  ,1\n", {}, "no non-empty text"),
    ],
)
def test_file_errors_are_one_line(tmp_path, name, content, kwargs, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        load_file(path, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_hub_dataset_offline_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load hub dataset") as err:
        load_hub("no-such-org/no-such-dataset-xyz")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [({"generator": "records"}, "size"), ({"generator": "poems", "size": 3}, "unknown generator"),
     ({"path": "x.csv", "size": 3}, "unknown corpus key 'size'"), ({}, "exactly one")],
)
def test_bad_corpus_specs(spec, needle):
    with pytest.raises(DataError, match=needle):
        load_corpus(spec)


def test_shards_are_disjoint_and_balanced():
    records = generate_records(23, 3)
    shards = shard(records, 4)
    assert [len(s) for s in shards] == [6, 6, 6, 5]
    assert [r for s in shards for r in s] == records
    with pytest.raises(DataError, match="cannot give 30 clients"):
        shard(records, 30)
    with pytest.raises(DataError):
        shard(records, 0)


def test_tokenize_pads_truncates_and_masks_labels():
    tok = tiny_tokenizer()
    records = generate_records(6, 1)
    out = tokenize(records, tok, 24)
    assert out["input_ids"].shape == (6, 24) == out["attention_mask"].shape == out["labels"].shape
    assert ((out["labels"] == -100) == (out["attention_mask"] == 0)).all()
    short = tokenize(records, tok, 8)
    assert short["attention_mask"].all()  # long records are truncated to exactly max_length
    for row, mask in zip(out["input_ids"], out["attention_mask"], strict=True):
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # right padding
        assert (row[mask == 0] == tok.pad_token_id).all()
