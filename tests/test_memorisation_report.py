"""The memorisation section of the report and its verdict rows (issue 26), from hand-written store rows, and a
``splitleak run`` with canaries that writes memorisation rows and a report showing the section."""

from pypdf import PdfReader

from reports import memorisation as memo
from reports.report import build_report
from reports.tables import prepare
from suite.cli import main
from suite.experiment.store import ResultsStore, load_results

CONFIG = {"model": {"name": "m"}, "data": {"max_length": 8}, "training": {"steps": 2}}
KEYS = {"section", "threat", "level", "attack", "advantage", "advantage_lo", "advantage_hi", "cheapest",
        "cheapest_cost"}


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
    assert rows["adapter_thief"]["attack"] == "extraction on server_adapters"
    assert rows["adapter_thief"]["level"] == "most" and rows["adapter_thief"]["cheapest"] is None
    user = rows["model_user"]
    assert user["level"] == "partial" and user["advantage"] == 0.3 - 0.01
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
