"""Utility under the defense: held-out loss with the deployed forward pass (noise included) on a held-out set
disjoint from training, per-sequence losses, perplexity, and the centralised reference."""

import math

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, eval_loss, eval_losses, train
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.experiment.data import DataError, load_corpus, load_private
from suite.experiment.utility import _CACHE, centralised_reference
from suite.interfaces.defense import make_defense

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 3, "batch_size": 2},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def _toy(vocab: int, n: int, seed: int) -> dict:
    """Learnable toy data (a few fixed sequences repeated), so the loss depends on what the trunk receives."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(2, vocab, (3, 12), generator=g)
    ids = patterns[torch.randint(0, 3, (n,), generator=g)]
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def test_held_out_loss_of_a_dp_model_is_computed_with_the_noise():
    model = tiny_model("llama").model
    vocab = model.config.vocab_size
    cfg = TrainConfig(clients=1, steps=25, batch_size=4, finetune=FinetuneConfig(lr=1e-2))
    session = build_session(model, SplitSpec(1, 1), [_toy(vocab, 12, 0)], cfg)
    train(session)
    data = _toy(vocab, 64, 0)
    noise_free = eval_loss(session, data)
    make_defense("dp_gaussian", {"sigma": 5.0, "clip": 1.0}).install(session)
    assert eval_loss(session, data, deployed=False) == pytest.approx(noise_free, abs=1e-5)  # the same model
    deployed = eval_loss(session, data)
    assert deployed > noise_free + 0.5, (deployed, noise_free)  # skipping the noise would fail this
    assert float(eval_losses(session, data).mean()) > noise_free + 0.5


def test_a_dp_cell_reports_the_deployed_utility(base):
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"sigma": 5.0, "clip": 1.0}))
    session, data = trained.prepared.session, trained.prepared.eval_data
    # Not the bare pass: the deployed pass draws DP noise (a bare pass is deterministic and would match it to
    # the last bit; the tiny model's outputs are near uniform, so the difference itself is small).
    assert trained.utility != eval_loss(session, data, deployed=False)
    assert eval_loss(session, data) != eval_loss(session, data)  # every deployed pass draws fresh noise
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
