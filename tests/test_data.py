"""Private and shadow corpora, local files, shards and tokenising. Nothing here touches the network."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from suite.errors import DataError
from suite.experiment.data import (
    PII_FIELDS,
    Record,
    generate_records,
    generate_shadow,
    load_corpus,
    load_file,
    load_hub,
    shard,
    tokenize,
)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained in memory on generated records: no download, any text tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([r.text for r in generate_records(100, 9)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


def test_generated_records_are_deterministic_per_seed():
    assert generate_records(30, 5) == generate_records(30, 5)
    assert [r.text for r in generate_records(30, 5)] != [r.text for r in generate_records(30, 6)]


def test_generated_records_are_identical_across_processes():
    code = "from suite.experiment.data import generate_records as g; print([r.text for r in g(20, 7)])"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": h}) for h in ("1", "2")]
    outs = {p.communicate()[0] for p in procs}
    assert outs == {str([r.text for r in generate_records(20, 7)]) + "\n"}


def test_pii_values_appear_verbatim_and_every_field_is_covered():
    records = generate_records(200, 1)
    seen = set()
    for r in records:
        assert r.pii, r.text
        assert "\n" not in r.text
        for field, value in r.pii.items():
            assert field in PII_FIELDS and value in r.text
            seen.add(field)
    assert seen == set(PII_FIELDS)
    assert len({r.text for r in records}) == len(records)


def test_records_are_short(tok):
    # Digit-by-digit tokenizers (the default SmolLM2) make numbers long; records must still fit max_length 32-64.
    records = generate_records(500, 4)
    assert max(len(r.text) for r in records) <= 130
    lengths = sorted(len(tok(r.text)["input_ids"]) for r in records)
    assert lengths[len(lengths) // 2] < lengths[-1] <= 2 * lengths[len(lengths) // 2]


def test_records_are_immutable_and_hashable():
    rec = Record("Call Ann Lee", {"name": "Ann Lee"})
    with pytest.raises(TypeError):
        rec.pii["name"] = "x"
    assert rec in {rec} and Record("x").pii == {}


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
    assert not any(v in r.text for r in shadow for v in values)  # not even inside another field
    spec_shadow = load_corpus({"generator": "records", "size": size, "seed": 2}, avoid=private)
    assert spec_shadow == shadow


def test_local_files_load(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("body,stars\nGreat food,5\n  ,3\nTerrible service,1\nFine,3\n")
    assert [r.text for r in load_file(csv, text_field="body")] == ["Great food", "Terrible service", "Fine"]
    assert [r.text for r in load_file(csv, text_field="body", limit=2)] == ["Great food", "Terrible service"]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c d"])))
    assert [r.text for r in load_file(jsonl)] == ["a b", "c d"]
    array = tmp_path / "r.json"
    array.write_text(json.dumps([{"review": " x "}, {"review": "y"}]))
    assert [r.text for r in load_file(array, text_field="review")] == ["x", "y"]
    txt = tmp_path / "r.txt"
    txt.write_text("one line\n\nanother line\n")
    assert [r.text for r in load_corpus({"path": str(txt)})] == ["one line", "another line"]
    assert load_file(txt)[0].pii == {}


def test_local_files_leave_no_copy_in_the_datasets_cache(tmp_path):
    import datasets.config

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*")) if cache.exists() else set()
    (tmp_path / "secret.txt").write_text("private line\n")
    assert load_file(tmp_path / "secret.txt")[0].text == "private line"
    assert (set(cache.rglob("*")) if cache.exists() else set()) == before


def test_file_corpus_avoids_private_texts_before_limit(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("a\nb\nc\nd\n")
    spec = {"path": str(txt), "limit": 2}
    assert [r.text for r in load_corpus(spec, avoid=[Record("a"), Record("c")])] == ["b", "d"]
    with pytest.raises(DataError, match="also in the private set"):
        load_corpus({"path": str(txt)}, avoid=[Record(t) for t in "abcd"])


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "needle"),
    [
        ("missing.csv", None, {}, "not found"),
        ("r.csv", "body\nhello\n", {"text_field": "txt"}, "no column 'txt'; columns are: body — set text_field"),
        ("r.parquet2", "x", {}, "unknown type"),
        ("r.jsonl", '{"text": "a"}\n{broken', {}, "cannot read data file"),
        ("r.csv", 'a,b\n1,2,3,4\n"unterminated\n', {}, "cannot read data file"),
        ("r.csv", "", {}, "cannot read data file"),
        ("r.txt", bytes(range(256)) * 4, {}, "UnicodeDecodeError"),
        ("r.csv", "text,n\n  ,1\n", {}, "no non-empty text"),
        ("r.txt", "a\n", {"limit": 0}, "limit must be"),
    ],
)
def test_file_errors_are_one_line(tmp_path, name, content, kwargs, needle):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        load_file(path, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_hub_dataset_offline_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load hub dataset 'no-such-org/no-such-dataset-xyz'") as err:
        load_corpus({"hub": "no-such-org/no-such-dataset-xyz", "split": "train", "limit": 3})
    assert "\n" not in str(err.value) and "use a local file" in str(err.value)
    with pytest.raises(DataError, match="cannot load hub dataset"):
        load_hub("no-such-org/other", config="x", split="test")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [({"generator": "records"}, "needs 'size'"), ({"generator": "poems", "size": 3}, "unknown generator"),
     ({"generator": "records", "size": "many"}, "whole numbers"),
     ({"generator": "records", "size": 0}, "size must be >= 1"),
     ({"path": "x.csv", "size": 3}, "unknown corpus key 'size'"), ({"path": "x.csv", "limit": -1}, "limit"),
     ({}, "exactly one"), ({"path": "x.csv", "hub": "y"}, "exactly one")],
)
def test_bad_corpus_specs(spec, needle):
    with pytest.raises(DataError, match=needle) as err:
        load_corpus(spec)
    assert "\n" not in str(err.value)


def test_shards_are_disjoint_and_balanced():
    records = generate_records(23, 3)
    shards = shard(records, 4)
    assert [len(s) for s in shards] == [6, 6, 6, 5]
    assert [r for s in shards for r in s] == records
    assert [len(s) for s in shard(records, 23)] == [1] * 23 and shard(records, 1) == [records]
    with pytest.raises(DataError, match="cannot give 30 clients"):
        shard(records, 30)
    with pytest.raises(DataError):
        shard(records, 0)


def test_tokenize_pads_truncates_and_masks_labels(tok):
    records = generate_records(6, 1) + [Record("hi")]
    out = tokenize(records, tok, 48)
    assert out["input_ids"].shape == (7, 48) == out["attention_mask"].shape == out["labels"].shape
    assert all(t.dtype.is_floating_point is False for t in out.values())
    assert ((out["labels"] == -100) == (out["attention_mask"] == 0)).all()
    assert not out["attention_mask"][-1].all()  # the short record is padded
    short = tokenize(records[:6], tok, 8)
    assert short["input_ids"].shape == (6, 8) and short["attention_mask"].all()  # truncated, not padded
    tok.padding_side = "left"  # a tokenizer set up for generation still gets right padding here
    try:
        left = tokenize(records, tok, 48)
    finally:
        tok.padding_side = "right"
    for key in out:
        assert left[key].equal(out[key])
    for row, mask in zip(out["input_ids"], out["attention_mask"], strict=True):
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # right padding
        assert (row[mask == 0] == tok.pad_token_id).all()


def test_tokenize_needs_a_pad_token(tok):
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    with pytest.raises(DataError, match="no pad token"):
        tokenize([Record("hi")], bare, 8)
