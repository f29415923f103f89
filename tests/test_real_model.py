"""The real default model (SmolLM2-135M from the PyPI wheel): split equals unsplit, and split training learns.
Slow (the first run converts the GGUF, ~30 s); CI runs them."""

import copy
import dataclasses

import pytest
import torch

from suite.engine.models import load_model
from suite.engine.parties import causal_lm_loss
from suite.engine.split import SplitSpec, split_model
from suite.engine.training import eval_loss, train
from suite.experiment.config import parse_config
from suite.experiment.prepared import prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_smollm2_split_equals_unsplit(smollm2):
    model = copy.deepcopy(smollm2.model)
    tok = smollm2.tokenizer
    enc = tok(["Patient Ana Ruiz (DOB 03/14/1987) has asthma.", "Call 555-0199."], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    with torch.no_grad():
        ref = model(**enc).logits
        split = split_model(model, SplitSpec(1, 1))
        out = split.forward(enc.input_ids, enc.attention_mask)
    real = enc.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert causal_lm_loss(out, labels) == pytest.approx(float(causal_lm_loss(ref, labels)), rel=1e-6)


def test_smollm2_split_training_reduces_loss(smollm2):
    cfg = parse_config({"data": {"max_length": 32, "private": {"generator": "records", "size": 40, "seed": 1}},
                        "training": {"clients": 2, "steps": 12, "strategy": "batch_parallel"}})
    loaded = dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model))
    prepared = prepare(cfg, SplitSpec(1, 1), loaded=loaded)
    before = eval_loss(prepared.session, prepared.eval_data)
    logs = train(prepared.session)
    assert sum(log.loss for log in logs[-3:]) < sum(log.loss for log in logs[:3])
    assert eval_loss(prepared.session, prepared.eval_data) < before
