"""Utility under the defense: held-out loss with the deployed forward pass (noise included) on a held-out set
disjoint from training, per-sequence losses, perplexity, and the centralised reference."""

import math

import pytest

from suite.cell import train_split
from suite.config import parse_config
from suite.data import DataError, load_corpus, load_private
from suite.defense import make_defense
from suite.models import tiny_model
from suite.split import SplitSpec
from suite.training import eval_loss, eval_losses
from suite.utility import _CACHE, centralised_reference

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 3, "batch_size": 2},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_held_out_loss_of_a_dp_cell_includes_the_noise(base):
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"sigma": 5.0, "clip": 1.0}))
    session, data = trained.prepared.session, trained.prepared.eval_data
    noise_free = eval_loss(session, data, deployed=False)  # the same trained model, without the defense's pass
    assert trained.utility > noise_free + 0.5, (trained.utility, noise_free)
    assert eval_loss(session, data) > noise_free + 0.5  # the default evaluation is the deployed one
    assert trained.perplexity == pytest.approx(math.exp(trained.utility))
    assert trained.eval_losses.shape == (64,)


def test_deployed_and_bare_passes_agree_without_a_defense(base):
    trained = train_split(CFG, SplitSpec(1, 1), base)
    session, data = trained.prepared.session, trained.prepared.eval_data
    assert trained.utility == pytest.approx(eval_loss(session, data, deployed=False), abs=1e-5)
    per_seq = eval_losses(session, data)
    assert per_seq.shape == (data["input_ids"].shape[0],)
    assert float(per_seq.min()) < trained.utility < float(per_seq.max())
    ref = trained.reference
    assert math.isfinite(ref["utility_centralised"])
    assert ref["perplexity_centralised"] == pytest.approx(math.exp(ref["utility_centralised"]))


def test_held_out_set_is_64_records_disjoint_from_training_and_keeps_the_private_set():
    spec = CFG.data.private.spec()
    private, held = load_private(spec, 64)
    assert len(held) == 64 and private == load_corpus(spec)
    assert not {r.text for r in held} & {r.text for r in private}


def test_file_corpus_held_out_comes_after_the_private_texts_or_a_one_line_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"line number {i} of the file" for i in range(20)) + "\n")
    private, held = load_private({"path": str(path), "limit": 10}, 5)
    assert [r.text for r in private] == [f"line number {i} of the file" for i in range(10)]
    assert [r.text for r in held] == [f"line number {i} of the file" for i in range(10, 15)]
    private, held = load_private({"path": str(path)}, 5)
    assert len(private) == 15 and len(held) == 5
    with pytest.raises(DataError, match="held_out") as err:
        load_private({"path": str(path), "limit": 10}, 64)
    assert "\n" not in str(err.value)


def test_centralised_reference_runs_once_per_training_config(base):
    centralised_reference(CFG, base)
    n = len(_CACHE)
    first = centralised_reference(CFG, base)
    assert len(_CACHE) == n and centralised_reference(CFG, base) == first
    other = CFG.model_copy(update={"training": CFG.training.model_copy(update={"steps": 4})})
    assert centralised_reference(other, base) != first and len(_CACHE) == n + 1
