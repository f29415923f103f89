"""The memorisation section of the report and its verdict rows, from hand-written store rows, and a
``splitleak run`` with canaries that writes memorisation rows and a report showing the section."""

from pypdf import PdfReader

from reports import memorisation as memo
from reports.report import build_report
from reports.tables import prepare
from suite.cli import main
from suite.experiment.store import ResultsStore, load_results

CONFIG = {"model": {"name": "m"}, "data": {"max_length": 8}, "training": {"steps": 2}}
KEYS = {"section", "threat", "level", "attack", "advantage", "advantage_lo", "advantage_hi", "cheapest",
        "cheapest_cost", "note"}


def _row(key, threat, attack, defense="none", *, view, perplexity=10.0, report=None, dparams=None, **metrics):
    detail = {"view": view, **metrics.pop("detail", {})}
    return {"key": key, "model": "m", "revision": "r", "head_blocks": 1, "tail_blocks": 1, "strategy": "per_client",
            "finetune": "lora", "threat": threat, "attack": attack, "attack_params": {}, "defense": defense,
            "defense_params": dparams or {}, "seed": 0, "config": CONFIG, "versions": {}, "status": "ok",
            "error": None, "note": "", "attack_seconds": 1.0, "utility": 2.0, "perplexity": perplexity,
            "defense_report": report or {}, "memorisation": detail, **metrics}


def _by(name, values):
    return {str(r): {name: v, f"{name}_lo": v * 0.5, f"{name}_hi": v * 1.5 + 0.01, f"{name}_max": v, "canaries": 4}
            for r, v in values.items()}


def _rows():
    fp = {"fp_at_1pct_fpr": 20, "fp_at_0_1pct_fpr": 2}
    dp = {"epsilon": 3.2, "does_not_cover": "the server itself"}
    return [
        _row("e1", "adapter_thief", "extraction", view="server_adapters", extracted=0.25, extracted_lo=0.05,
             extracted_hi=0.6, detail={"by_repeats": _by("extracted", {1: 0.0, 10: 1.0})}),
        _row("x1", "adapter_thief", "canary_exposure", view="server_adapters", exposure=12.0, exposure_lo=10.0,
             exposure_hi=14.0, detail={"space_bits": 39.86, "by_repeats": _by("exposure", {1: 2.0, 10: 22.0})}),
        _row("m1", "model_user", "membership", view="released_model", auc=0.8, auc_lo=0.78, auc_hi=0.82,
             tpr_at_1pct_fpr=0.3, tpr_at_1pct_fpr_lo=0.25, tpr_at_1pct_fpr_hi=0.35, tpr_at_0_1pct_fpr=0.1,
             tpr_at_0_1pct_fpr_lo=0.05, tpr_at_0_1pct_fpr_hi=0.15,
             detail={"signal": "reference", "non_members": 2000, "false_positives": fp,
                     "roc": {"fpr": [0.0, 0.001, 0.01, 1.0], "tpr": [0.0, 0.1, 0.3, 1.0]}}),
        _row("m2", "model_user", "membership", "dp_sgd", view="released_model", perplexity=11.0, report=dp,
             dparams={"sigma": 2.0}, auc=0.5, auc_lo=0.48, auc_hi=0.52, tpr_at_1pct_fpr=0.012,
             tpr_at_1pct_fpr_lo=0.005, tpr_at_1pct_fpr_hi=0.02, tpr_at_0_1pct_fpr=0.001,
             detail={"signal": "reference", "non_members": 2000, "false_positives": fp}),
        # too few non-members: the low-FPR rate rests on no false positive and must never read as safe
        _row("m3", "colluding_client", "membership", view="colluder_model", auc=0.5, tpr_at_1pct_fpr=0.0,
             tpr_at_1pct_fpr_lo=0.0, tpr_at_1pct_fpr_hi=0.02,
             detail={"signal": "loss", "non_members": 32, "false_positives": {"fp_at_1pct_fpr": 0}}),
    ]


def test_verdict_rows_have_the_page_one_keys_and_honest_levels(tmp_path):
    with ResultsStore(tmp_path) as store:
        for row in _rows():
            store.write(row)
    rows = {r["threat"]: r for r in memo.verdict_rows(prepare(load_results(tmp_path)))}
    assert all(set(r) == KEYS for r in rows.values())
    # a 10x canary's exposure reaches 33 bits of 39.86: the strongest memorisation attack there
    assert rows["adapter_thief"]["attack"] == "canary_exposure on server_adapters"
    assert rows["adapter_thief"]["level"] == "most" and rows["adapter_thief"]["cheapest"] is None
    user = rows["model_user"]
    assert user["level"] == "most" and abs(user["advantage"] - (2 * 0.8 - 1)) < 1e-9  # AUC's, > TPR's 0.29
    assert user["cheapest"] == "dp_sgd (sigma=2)" and abs(user["cheapest_cost"] - 0.1) < 1e-9
    assert rows["colluding_client"]["level"] == "unknown"


def test_report_has_the_memorisation_section(tmp_path):
    with ResultsStore(tmp_path) as store:
        for row in _rows():
            store.write(row)
    text = " ".join("".join(p.extract_text() for p in PdfReader(build_report(tmp_path)).pages).split())
    assert "Memorisation" in text
    assert "the server's adapters memorise: a 10× canary is extracted" in text
    assert "does not protect against the server itself" in text
    assert "TPR 10.0 % at 0.1 % FPR, resting on 2 false positives" in text
    assert "0.1 % FPR is not measurable with 32 non-members" in text


def test_run_with_canaries_writes_memorisation_rows_and_the_report_shows_them(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text("""
[model]
name = "tiny-llama"
[data]
max_length = 24
private = { generator = "records", size = 16, seed = 1 }
shadow = { generator = "records", size = 8, seed = 2 }
held_out = 8
canaries = { count = 2, repeats = [1, 4] }
[training]
strategy = "serial"
clients = 2
steps = 2
batch_size = 4
[matrix]
splits = [1]
threats = ["model_user", "eavesdropper"]
attacks = ["membership", "extraction"]
defenses = ["none"]
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 0
    df = load_results(tmp_path / "out")
    assert set(df["threat"]) == {"model_user"} and set(df["status"]) == {"ok"}
    member = df[df["attack"] == "membership"].iloc[0]
    assert 0 <= member["auc"] <= 1 and member["auc_lo"] <= member["auc"] <= member["auc_hi"]
    assert member["memorisation"]["members"] == 8 and member["memorisation"]["non_members"] == 8
    extraction = df[df["attack"] == "extraction"].iloc[0]
    assert set(extraction["memorisation"]["by_repeats"]) == {"1", "4"}
    text = "".join(p.extract_text() for p in PdfReader(tmp_path / "out" / "report.pdf").pages)
    assert "Memorisation" in text


def _verdicts(tmp_path, rows):
    with ResultsStore(tmp_path) as store:
        for row in rows:
            store.write(row)
    return memo.verdict_rows(prepare(load_results(tmp_path)))


def _membership(key, threat, defense="none", *, auc, tpr, view="released_model", **kw):
    fp = {"fp_at_1pct_fpr": 20, "fp_at_0_1pct_fpr": 2}
    return _row(key, threat, "membership", defense, view=view, auc=auc, auc_lo=auc - 0.02, auc_hi=auc + 0.02,
                tpr_at_1pct_fpr=tpr, tpr_at_1pct_fpr_lo=tpr / 2, tpr_at_1pct_fpr_hi=tpr + 0.005,
                detail={"signal": "reference", "non_members": 2000, "false_positives": fp}, **kw)


def test_exposure_alone_gives_a_level_and_failed_threats_an_unknown_row(tmp_path):
    """Finding 1: a threat that ran only canary_exposure, at 30 bits of 40, has a page-1 row, not safe; a
    threat whose every cell failed has an "unknown" row."""
    exposed = _row("x", "adapter_thief", "canary_exposure", view="server_adapters", exposure=30.0,
                   exposure_lo=28.0, exposure_hi=32.0, detail={"space_bits": 40.0})
    failed = {**_row("f", "model_user", "membership", view="released_model"), "status": "failed",
              "error": "out of memory"}
    rows = {r["threat"]: r for r in _verdicts(tmp_path, [exposed, failed])}
    assert rows["adapter_thief"]["level"] == "most" and rows["adapter_thief"]["advantage_hi"] == 32.0 / 40.0
    assert rows["model_user"]["level"] == "unknown" and "out of memory" in rows["model_user"]["note"]


def test_exposure_of_a_few_bits_is_not_none(tmp_path):
    low = _row("x", "adapter_thief", "canary_exposure", view="server_adapters", exposure=3.0, exposure_lo=2.0,
               exposure_hi=5.0, detail={"space_bits": 40.0})
    assert _verdicts(tmp_path, [low])[0]["level"] == "partial"


def test_membership_auc_counts_when_tpr_at_low_fpr_is_small(tmp_path):
    """Finding 5: AUC 0.75 with TPR 5 % at 1 % FPR leaks (2 * 0.77 - 1 = 0.54), it is not "little"."""
    (row,) = _verdicts(tmp_path, [_membership("m", "model_user", auc=0.75, tpr=0.05)])
    assert row["level"] == "most" and abs(row["advantage_hi"] - (2 * 0.77 - 1)) < 1e-9


def test_cheapest_needs_every_attack_of_the_threat_at_that_setting(tmp_path):
    """Finding 2: dp_sgd bringing membership to little is not a cure when extraction, also run undefended
    there, was not run (or still leaks) under dp_sgd; and a setting's credit is named with its setting."""
    dp = {"epsilon": 3.0}
    base = [_membership("m0", "model_user", auc=0.9, tpr=0.4),
            _row("e0", "model_user", "extraction", view="released_model", extracted=0.02, extracted_lo=0.0,
                 extracted_hi=0.05),
            _membership("m1", "model_user", "dp_sgd", auc=0.5, tpr=0.01, report=dp, dparams={"sigma": 2.0})]
    (row,) = _verdicts(tmp_path / "a", base)
    assert row["cheapest"] is None
    leaky = _row("e1", "model_user", "extraction", "dp_sgd", view="released_model", report=dp,
                 dparams={"sigma": 2.0}, extracted=0.2, extracted_lo=0.1, extracted_hi=0.3)
    (row,) = _verdicts(tmp_path / "b", [*base, leaky])
    assert row["cheapest"] is None
    quiet = {**leaky, "key": "e2", "extracted": 0.0, "extracted_lo": 0.0, "extracted_hi": 0.01}
    (row,) = _verdicts(tmp_path / "c", [*base, quiet])
    assert row["cheapest"] == "dp_sgd (sigma=2)"
    # dp_sgd measured only at another split: credited with that split named, never silently
    other = [{**r, "key": r["key"] + "k2", "head_blocks": 2} for r in (base[2], quiet)]
    (row,) = _verdicts(tmp_path / "d", [*base[:2], *other])
    assert row["cheapest"] == "dp_sgd (sigma=2) at per_client, lora, k=2"


def test_rows_are_per_model(tmp_path):
    """Finding 10: the same threat on two models gives two rows (threat_label), not one merged row."""
    a = _membership("a", "model_user", auc=0.9, tpr=0.4)
    b = {**_membership("b", "model_user", auc=0.5, tpr=0.01), "model": "other"}
    rows = _verdicts(tmp_path, [a, b])
    assert sorted(r["threat"] for r in rows) == ["m: model_user", "other: model_user"]


def test_dp_sgd_epsilon_is_shown_only_beside_the_views_its_target_covers(tmp_path):
    """Red team: ε = 3.2 beside the released model's row with target = "server" (whose heads and tails
    trained without DP), and a sentence saying server-side DP-SGD protects against model users."""
    dp = {"epsilon": 3.2, "target": "server", "covers_views": ["server_adapters", "colluder_model"],
          "does_not_cover": "the server itself"}
    thief = _row("x2", "adapter_thief", "canary_exposure", "dp_sgd", view="server_adapters", report=dp,
                 dparams={"sigma": 2.0}, exposure=1.0, detail={"space_bits": 39.86})
    user = _row("m2", "model_user", "membership", "dp_sgd", view="released_model", report=dp,
                dparams={"sigma": 2.0}, auc=0.5, tpr_at_1pct_fpr=0.012,
                detail={"signal": "reference", "non_members": 2000})
    assert memo.dp_covers(dp, "server_adapters") and not memo.dp_covers(dp, "released_model")
    assert memo.dp_covers({"epsilon": 1.0, "target": "both"}, "released_model")  # older rows: from the target
    assert not memo.dp_covers({"epsilon": 1.0, "target": "clients"}, "released_model")
    # older rows of target server: the clients' parts may have trained without DP, so nothing is known covered
    assert not memo.dp_covers({"epsilon": 1.0, "target": "server"}, "server_adapters")
    with ResultsStore(tmp_path) as store:
        for row in (thief, user):
            store.write(row)
    frame = prepare(load_results(tmp_path))
    [sentence] = memo.dp_sentences(frame)
    assert "target = server" in sentence and "not in the released model" in sentence
    assert "model users" not in sentence
    text = " ".join("".join(p.extract_text() for p in PdfReader(build_report(tmp_path)).pages).split())
    assert text.count("3.20") == 1  # the adapter thief's row only; the released model's row shows "–"


def test_dp_sgd_whose_other_side_trained_without_dp_is_said_to_bound_nothing(tmp_path):
    dp = {"epsilon": 0.9, "target": "server", "covers_views": [], "guarantee": "none: the clients' heads and tails "
          "train on the records without DP", "does_not_cover": "the server itself"}
    thief = _row("x3", "adapter_thief", "canary_exposure", "dp_sgd", view="server_adapters", report=dp,
                 dparams={"sigma": 2.0}, exposure=1.0, detail={"space_bits": 39.86})
    with ResultsStore(tmp_path) as store:
        store.write(thief)
    [sentence] = memo.dp_sentences(prepare(load_results(tmp_path)))
    assert "bounds nothing here" in sentence and "It bounds what" not in sentence
    assert not memo.dp_covers(dp, "server_adapters")


def test_the_benchmark_table_script_reads_a_store(tmp_path):
    """examples/scripts/memorisation_table.py: one line per (setting, finetune, view) with every column filled
    from its rows, ε only beside a view its target covers."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "scripts" / "memorisation_table.py"
    spec = importlib.util.spec_from_file_location("memorisation_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    covered = {"epsilon": 3.2, "target": "server", "covers_views": ["server_adapters"]}
    rows = [*_rows()[:3],
            _row("m4", "adapter_thief", "membership", "dp_sgd", view="server_adapters", report=covered,
                 dparams={"sigma": 2.0, "target": "server"}, auc=0.5, auc_lo=0.48, auc_hi=0.52, tpr_at_1pct_fpr=0.01,
                 tpr_at_1pct_fpr_lo=0.0, tpr_at_1pct_fpr_hi=0.02, tpr_at_0_1pct_fpr=0.0, tpr_at_0_1pct_fpr_lo=0.0,
                 tpr_at_0_1pct_fpr_hi=0.01, detail={"signal": "loss", "false_positives": {"fp_at_1pct_fpr": 10}}),
            _row("m5", "model_user", "membership", "dp_sgd", view="released_model", report=covered,
                 dparams={"sigma": 2.0, "target": "server"}, auc=0.6, auc_lo=0.5, auc_hi=0.7, tpr_at_1pct_fpr=0.01,
                 tpr_at_1pct_fpr_lo=0.0, tpr_at_1pct_fpr_hi=0.02, tpr_at_0_1pct_fpr=0.0, tpr_at_0_1pct_fpr_lo=0.0,
                 tpr_at_0_1pct_fpr_hi=0.01, detail={"signal": "loss", "false_positives": {}})]
    with ResultsStore(tmp_path) as store:
        for row in rows:
            store.write(row)
    lines = script.table([str(tmp_path)]).splitlines()[2:]
    thief = next(line for line in lines if line.startswith("| per_client | lora | server_adapters"))
    assert "10×: 22.00 [11.00, 33.01]" in thief and "2 of 8 [0.05, 0.60]" in thief
    user = next(line for line in lines if line.startswith("| per_client | lora | released_model"))
    assert "0.800 [0.780, 0.820] (reference)" in user and "30.0 % [25.0, 35.0] (20)" in user
    assert any("sigma = 2.0, target = server (ε = 3.20) | lora | server_adapters" in line for line in lines)
    assert any("sigma = 2.0, target = server (no guarantee) | lora | released_model" in line for line in lines)
