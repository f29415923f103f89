"""Memorisation rows pool over seeds: the aggregate row's exposure, AUC and TPR at low FPR are means
over records x seeds with intervals that resample seeds and records, as the leakage metrics' do; one seed is
the plain record bootstrap, unchanged."""

import numpy as np
import pytest

from suite.cli import main
from suite.experiment.store import load_results
from suite.scoring.memorisation import (
    _auc,
    mean_summary,
    membership_summary,
    pooled_mean_summary,
    pooled_membership_summary,
)


def test_pooled_membership_is_the_mean_of_the_seeds_with_a_records_x_seeds_interval():
    rng = np.random.default_rng(0)
    strong = (rng.normal(1.0, 1, 400), rng.normal(0, 1, 400))
    weak = (rng.normal(0.2, 1, 400), rng.normal(0, 1, 400))
    one = membership_summary(*strong)
    assert pooled_membership_summary([strong]) == one  # one seed: exactly the record bootstrap
    both = pooled_membership_summary([strong, weak])
    assert both["auc"] == pytest.approx((_auc(*strong) + _auc(*weak)) / 2)
    assert both["auc_lo"] < both["auc"] < both["auc_hi"]
    # two models that disagree: the seeds' spread widens the interval beyond either seed's own
    assert both["auc_hi"] - both["auc_lo"] > one["auc_hi"] - one["auc_lo"]
    assert both["auc_lo"] < _auc(*weak) + 0.03 and both["auc_hi"] > _auc(*strong) - 0.03
    assert both["fp_at_1pct_fpr"] == 4 and both["fp_at_0_1pct_fpr"] == 0  # per seed: 400 non-members each


def test_pooled_means_over_canaries_x_seeds():
    values = [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    mean, lo, hi = pooled_mean_summary(values)
    assert mean == 4.0 and lo < 4.0 < hi and lo >= 1.0 and hi <= 7.0
    assert pooled_mean_summary([values[0]]) == mean_summary(values[0])
    _, lo, hi = pooled_mean_summary([[0.0] * 5, [0.0] * 5], binary=True)
    assert lo == 0.0 and hi > 0.25  # none of 10 extracted: Clopper-Pearson, not [0, 0]
    with pytest.raises(ValueError, match="same canaries"):
        pooled_mean_summary([[1.0], [1.0, 2.0]])


def test_a_run_with_two_seeds_writes_pooled_memorisation_rows(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text("""
[model]
name = "tiny-llama"
[data]
max_length = 24
private = { generator = "records", size = 16, seed = 1 }
shadow = { generator = "records", size = 8, seed = 2 }
held_out = 8
canaries = { count = 2, repeats = [1, 4], format = "####" }
[training]
strategy = "per_client"
clients = 2
steps = 2
batch_size = 4
[matrix]
splits = [1]
threats = ["model_user"]
attacks = ["membership", "extraction", "canary_exposure"]
defenses = ["none"]
seeds = [1, 2]
blind = false
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--no-report"]) == 0
    every = load_results(tmp_path / "out", per_seed=True)
    pooled = load_results(tmp_path / "out")
    assert len(pooled) == 3 and pooled.seed.isna().all() and all(s == [1, 2] for s in pooled.seeds)
    member = pooled[pooled.attack == "membership"].iloc[0]
    seeded = every[(every.attack == "membership") & every.seed.notna()]
    assert len(seeded) == 2
    assert member["auc"] == pytest.approx(seeded["auc"].mean())
    assert member["tpr_at_1pct_fpr"] == pytest.approx(seeded["tpr_at_1pct_fpr"].mean())
    for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
        assert member[f"{m}_lo"] <= member[m] <= member[f"{m}_hi"]
    assert member["memorisation"]["members"] == 16 and member["memorisation"]["seeds"] == [1, 2]
    assert "records x seeds" in member["note"]
    extraction = pooled[pooled.attack == "extraction"].iloc[0]
    per_seed = every[(every.attack == "extraction") & every.seed.notna()]
    assert extraction["extracted"] == pytest.approx(per_seed["extracted"].mean())
    assert extraction["extracted_lo"] <= extraction["extracted"] <= extraction["extracted_hi"]
    assert set(extraction["memorisation"]["by_repeats"]) == {"1", "4"}
    assert extraction["memorisation"]["by_repeats"]["4"]["canaries"] == 2
    exposure = pooled[pooled.attack == "canary_exposure"].iloc[0]
    per_seed = every[(every.attack == "canary_exposure") & every.seed.notna()]
    assert exposure["exposure"] == pytest.approx(per_seed["exposure"].mean())  # 4 canaries in each seed
    assert exposure["exposure_lo"] <= exposure["exposure"] <= exposure["exposure_hi"]
    by = exposure["memorisation"]["by_repeats"]
    assert by["4"]["exposure"] == pytest.approx(np.mean([s["memorisation"]["by_repeats"]["4"]["exposure"]
                                                         for _, s in per_seed.iterrows()]))


def test_a_pooled_row_whose_seeds_read_different_views_says_so():
    """view = "auto" reports each seed's strongest view: a pooled row must not carry the first seed's name
    (a defence's ε would be shown beside a number that is partly another view's)."""
    from suite.experiment.memorisation import pooled_fields

    def seed_row(seed, view):
        return {"seed": seed, "memorisation": {"view": view, "signal": "reference", "repeats": [1, 1]}}

    scores = [{"memorisation": {"repeats": [1, 1], "exposure": [1.0, 2.0]}},
              {"memorisation": {"repeats": [1, 1], "exposure": [3.0, 4.0]}}]
    mixed = pooled_fields([seed_row(1, "server_adapters"), seed_row(2, "released_model")], scores)["memorisation"]
    assert mixed["view"] == "mixed: released_model, server_adapters"
    assert mixed["view_by_seed"] == {"1": "server_adapters", "2": "released_model"}
    assert mixed["signal"] == "reference" and "signal_by_seed" not in mixed
    same = pooled_fields([seed_row(1, "server_adapters"), seed_row(2, "server_adapters")], scores)["memorisation"]
    assert same["view"] == "server_adapters" and "view_by_seed" not in same
