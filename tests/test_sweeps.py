"""Sweeps, training axes and seeds in the matrix; the blind baseline and the advantage over it; the
encryption training cache."""

import json

import pytest

from suite.errors import ConfigError
from suite.experiment.config import parse_config
from suite.experiment.plan import cell_key, expand
from suite.experiment.schedule import run_matrix
from suite.experiment.store import ADVANTAGE_COLUMNS, METRICS, ResultsStore, comparable, load_results

TINY = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 32, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
}


def _cfg(**matrix):
    return parse_config({**TINY, "matrix": {"splits": [1], "threats": ["curious_server"],
                                            "attacks": ["nearest_embedding"], "defenses": ["none"], **matrix}})


def test_list_parameters_expand_to_one_cell_each_and_lists_multiply():
    cfg = _cfg(defenses=["none", {"name": "dxp", "eta": [10, 30, 100]},
                         {"name": "dp_gaussian", "sigma": [0.1, 1.0], "clip": [1.0, 2.0]}], blind=False)
    cells, _ = expand(cfg)
    params = [(c.defense, json.loads(c.defense_params)) for c in cells]
    assert params[:4] == [("none", {}), ("dxp", {"eta": 10}), ("dxp", {"eta": 30}), ("dxp", {"eta": 100})]
    assert {json.dumps(p, sort_keys=True) for d, p in params if d == "dp_gaussian"} == {
        json.dumps({"sigma": s, "clip": c}, sort_keys=True) for s in (0.1, 1.0) for c in (1.0, 2.0)}
    assert len(cells) == 1 + 3 + 4
    assert len({c.label() for c in cells}) == len(cells)
    assert len({cell_key(c, cfg, "rev") for c in cells}) == len(cells)
    assert len({c.training_group() for c in cells}) == len(cells)  # each setting trains its own run


def test_attack_sweeps_and_training_axes():
    cfg = _cfg(attacks=[{"name": "learned_inversion", "mode": "linear", "seed": [0, 1]}],
               steps=[0, 3], finetune=["lora", "full"], blind=False)
    cells, _ = expand(cfg)
    assert len(cells) == 2 * 2 * 2
    assert {(c.steps, c.finetune) for c in cells} == {(0, "lora"), (0, "full"), (3, "lora"), (3, "full")}
    assert len({cell_key(c, cfg, "rev") for c in cells}) == 8 and len({c.label() for c in cells}) == 8
    assert "finetune=full steps=3" in next(c for c in cells if c.steps == 3 and c.finetune == "full").label()
    assert len({c.training_group() for c in cells}) == 4  # the attack's seed shares a training run


def test_seeds_enter_the_key_and_an_unswept_cell_keeps_its_key():
    plain = _cfg(blind=False)
    seeded = _cfg(seeds=[0, 1, 2], blind=False)
    (cell,), _ = expand(plain)
    cells, _ = expand(seeded)
    assert [c.seed for c in cells] == [0, 1, 2]
    keys = [cell_key(c, seeded, "rev") for c in cells]
    assert len(set(keys)) == 3
    assert keys[0] == cell_key(cell, plain, "rev")  # seed 0 is [training]'s seed: the same cell
    assert cell_key(next(iter(expand(_cfg(steps=[2], blind=False))[0])), plain, "rev") == cell_key(cell, plain, "rev")


@pytest.mark.parametrize(
    ("matrix", "needle"),
    [
        ({"defenses": ["none", "none", {"name": "dxp", "eta": [10, -1]}]}, "matrix.defenses[2].eta[1]:"),
        ({"defenses": [{"name": "dxp", "eta": []}]}, "matrix.defenses[0].eta: an empty list"),
        ({"attacks": [{"name": "learned_inversion", "mode": ["linear", "bogus"]}]}, "matrix.attacks[0].mode[1]:"),
        ({"seeds": []}, "seeds: an empty list"),
        ({"steps": [1, 1]}, "repeats"),
        ({"finetune": ["lora", "partial"]}, "finetune"),
    ],
)
def test_sweep_errors_name_the_entry(matrix, needle):
    with pytest.raises(ConfigError) as err:
        expand(_cfg(**matrix))
    assert needle in str(err.value)


def test_blind_rows_and_advantage_equal_metric_minus_blind(tmp_path):
    cfg = _cfg(threats=["curious_server", "colluding_client"], defenses=["none", {"name": "dxp", "eta": [500]}])
    run_matrix(cfg, tmp_path)
    df = load_results(tmp_path)
    assert set(df.status) == {"ok"}
    assert len(df[df.attack == "blind"]) == 2 * 2  # one per threat (victim set) and defense setting
    for _, row in df[df.attack != "blind"].iterrows():
        blind = df[(df.attack == "blind") & (df.threat == row.threat) & (df.defense == row.defense)
                   & (df.defense_params.map(json.dumps) == json.dumps(row.defense_params))].iloc[0]
        for m in METRICS:
            if row[m] is None or blind[m] is None:
                continue
            assert row[f"adv_{m}"] == pytest.approx(row[m] - blind[m]), m
            assert row[f"adv_{m}_lo"] <= row[f"adv_{m}"] + 1e-9 <= row[f"adv_{m}_hi"] + 2e-9, m
            assert row[f"{m}_lo"] <= row[m] + 1e-9 and row[m] <= row[f"{m}_hi"] + 1e-9, m
        assert row.utility_lo <= row.utility <= row.utility_hi
    for col in ADVANTAGE_COLUMNS:
        assert col in df.columns
    assert (df[df.attack == "blind"].adv_token_accuracy == 0).all()


def test_seeds_give_per_seed_rows_and_one_aggregate_row(tmp_path):
    cfg = _cfg(seeds=[1, 2])
    run_matrix(cfg, tmp_path)
    df = load_results(tmp_path)
    every = load_results(tmp_path, per_seed=True)
    assert len(every) == 2 * 2 + 2  # (attack + blind) x seeds, and their two aggregates
    assert len(df) == 2 and df.seed.isna().all() and all(s == [1, 2] for s in df.seeds)
    seeded = every[every.seed.notna() & (every.attack == "nearest_embedding")]
    agg = df[df.attack == "nearest_embedding"].iloc[0]
    assert sorted(seeded.seed) == [1, 2] and set(seeded.aggregate_key) == {agg.key}
    # equal record counts per seed: the pooled value is the mean of the seeds' values
    assert agg.token_accuracy == pytest.approx(seeded.token_accuracy.mean())
    assert agg.utility == pytest.approx(seeded.utility.mean())
    assert agg.token_accuracy_lo <= agg.token_accuracy <= agg.token_accuracy_hi
    assert agg.adv_token_accuracy is not None
    again = run_matrix(cfg, tmp_path)
    assert again["ran"] == 0 and len(load_results(tmp_path, per_seed=True)) == 6


def test_encryption_reuses_training_and_gives_the_rows_of_an_uncached_run(tmp_path, monkeypatch):
    import suite.experiment.plan as plan
    import suite.experiment.run

    cfg = parse_config({**TINY, "matrix": {"splits": [1], "threats": ["curious_server", "eavesdropper"],
                                           "attacks": ["nearest_embedding", "wire_inversion"],
                                           "defenses": ["none", "encryption"]}})
    trained = []
    real = suite.experiment.run.train_split

    def counted(*args, **kwargs):
        trained.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(suite.experiment.run, "train_split", counted)
    run_matrix(cfg, tmp_path / "cached")
    assert len(trained) == 1
    monkeypatch.setattr(plan, "SHARE_WIRE_ONLY_TRAINING", False)
    run_matrix(cfg, tmp_path / "uncached")
    assert len(trained) == 3

    def rows(path):
        with ResultsStore(path) as store:
            return [{k: v for k, v in r.items() if k != "versions"} for r in comparable(store.rows())]

    cached, uncached = rows(tmp_path / "cached"), rows(tmp_path / "uncached")
    assert cached == uncached
    wire = [r for r in cached if r["threat"] == "eavesdropper" and r["attack"] == "wire_inversion"]
    assert {r["defense"]: r["token_accuracy"] > 0 for r in wire} == {"none": True, "encryption": False}


def test_skip_rules_leave_cells_out_and_say_why():
    cfg = _cfg(threats=["curious_server", "malicious_server"], attacks=["nearest_embedding", "fsha"],
               defenses=["none", {"name": "dxp", "eta": [10, 100]}],
               skip=[{"attack": "fsha", "defense": "dxp", "defense_params": {"eta": 10}}], blind=False)
    cells, skipped = expand(cfg)
    fsha = [(c.defense, c.defense_params) for c in cells if c.attack == "fsha"]
    assert fsha == [("none", "{}"), ("dxp", '{"eta":100}')]
    assert any(r == "left out by matrix.skip[0]" for _, r in skipped)
    with pytest.raises(ConfigError, match="skip"):
        _cfg(skip=[{"attak": "fsha"}])


def test_training_axes_reach_the_training_run(tmp_path):
    cfg = _cfg(steps=[0, 3], blind=False)
    run_matrix(cfg, tmp_path)
    df = load_results(tmp_path).set_index("steps")
    assert sorted(df.index) == [0, 3] and set(df.status) == {"ok"}
    assert df.loc[0, "config"]["training"]["steps"] == 0 and df.loc[3, "config"]["training"]["steps"] == 3
    assert df.loc[0, "utility"] != df.loc[3, "utility"]  # three steps of training moved the model
    assert (df.finetune == "lora").all()


def test_every_training_axis_reaches_the_group_the_label_the_key_and_the_config():
    """A new [matrix] training sweep is an entry in ``plan.AXES``, a ``Cell`` field and its list in the config:
    grouping, the label (and so the gate and the report), the key, the row's ``axes`` and the cell's
    [training] all follow from ``AXES``. Extend ``values`` here with the new axis."""
    import dataclasses

    from suite.experiment.plan import AXES, Cell, cell_config, cell_row

    cfg = parse_config(TINY)
    base = Cell(1, 1, "curious_server", "nearest_embedding", "{}", "none", "{}")
    values = {"steps": 3, "finetune": "full", "seed": 7}
    assert set(values) == set(AXES)
    for axis, v in values.items():
        assert hasattr(cfg.matrix, AXES[axis])
        cell = dataclasses.replace(base, **{axis: v})
        assert cell.axes() == {axis: v} and f" {axis}={v}" in cell.label()
        assert cell.training_group() != base.training_group()
        assert cell_key(cell, cfg, "rev") != cell_key(base, cfg, "rev")
        assert getattr(cell_config(cfg, cell).training, axis) == v
        assert cell_row(cell, "k", cfg, "rev")["axes"] == {axis: v}
