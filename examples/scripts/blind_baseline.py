"""The blind baseline on the default model and data: each candidate's token accuracy on 64 generated victims,
from shadow text, public weights and the victims' lengths only (BENCHMARKS.md, "The blind baseline"). From the
repo root: ``PYTHONPATH=. python examples/scripts/blind_baseline.py``."""

import copy

import torch

from attacks.blind import BlindAttack, BlindConfig
from attacks.toolkit.observe import tokenize
from suite.engine.models import load_model
from suite.engine.split import SplitSpec
from suite.experiment.data import generate_records, generate_shadow
from suite.interfaces.threats import Observations, get_threat
from suite.scoring.metrics import token_accuracy


def main() -> None:
    torch.set_num_threads(1)
    base = load_model("smollm2-135m")
    private = generate_records(64, 1)
    shadow = generate_shadow(256, 2, private=private)
    ids, mask = tokenize(base.tokenizer, [r.text for r in private], 32)
    obs = Observations(threat=get_threat("eavesdropper"), spec=SplitSpec(1, 1), tokenizer=base.tokenizer,
                       max_length=32, base_model=lambda: copy.deepcopy(base.model),
                       shadow=tuple(r.text for r in shadow), lengths=tuple(int(n) for n in mask.sum(1)))
    for cand in ("auto", "position_prior", "length_prior", "aligned_prior", "lm_greedy"):
        rec = BlindAttack(BlindConfig(candidate=cand)).reconstruct(obs)
        print(f"{cand:15s} victims' token accuracy {token_accuracy(ids, rec.token_ids, mask):.3f}  {rec.note}", flush=True)
    rand = torch.randint(0, base.model.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    print(f"uniform random  victims' token accuracy {token_accuracy(ids, rand, mask):.4f}")


if __name__ == "__main__":
    main()
