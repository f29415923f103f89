"""Page 1 of the report: one verdict table with one schema (``VerdictRow``) that every section adds
rows to, at most three sentences, on one page; "acted" from the cost and leakage intervals; defenses that do
not address a threat listed as such; the leakage-versus-depth table with BLEU-4, ROUGE-L and token accuracy,
intervals and the blind row; DP's clip from a quantile of the public head's output norms on shadow text."""

import math

import pytest
import torch
from pypdf import PdfReader
from synthetic_store import cell, sweep_rows, write_store

from reports import tables
from reports.frontier import settings
from reports.report import build_report
from reports.verdict import (
    MAX_SENTENCES,
    VerdictRow,
    cheapest_text,
    from_dicts,
    key_sentences,
    threat_verdict,
    training_rows,
)
from suite.experiment.store import load_results

PROTECTS_WIRE = {"mode": "aes-gcm", "protects": ["wire"]}


def _frame(tmp_path, rows):
    return tables.prepare(load_results(write_store(tmp_path, rows)))


def _with_encryption_report(rows):
    return [{**r, "defense_report": PROTECTS_WIRE} if r["defense"] == "encryption" else r for r in rows]


def _page_text(pdf, i):
    return " ".join(PdfReader(pdf).pages[i].extract_text().split())


def test_the_schema_accepts_exactly_the_keys_other_sections_expose():
    keys = {"section": "inference", "threat": "curious_server", "level": "partial", "attack": "x at k=1",
            "advantage": 0.3, "advantage_lo": 0.2, "advantage_hi": 0.4, "cheapest": None, "cheapest_cost": None}
    [row] = from_dicts([keys])
    assert row.not_addressed == () and cheapest_text(row) == "none tested"
    [row] = from_dicts([{**keys, "not_addressed": ["encryption"], "cheapest": "dp_sgd (sigma=1) at k=1",
                         "cheapest_cost": 0.2}])
    assert row.not_addressed == ("encryption",) and cheapest_text(row) == "dp_sgd (sigma=1) at k=1: +20 % perplexity"
    with pytest.raises(ValueError, match="level 'high' is not one of none, little, partial, most, unknown"):
        VerdictRow(**{**keys, "level": "high"})
    with pytest.raises(TypeError):
        VerdictRow(**{**keys, "bogus": 1})


def test_one_row_per_threat_with_its_level_and_cheapest_sufficient_setting(tmp_path):
    rows = training_rows(_frame(tmp_path, _with_encryption_report(sweep_rows())))
    by = {r.threat: r for r in rows}
    assert list(by) == ["curious_server", "eavesdropper"] and len(rows) == 2
    server, wire = by["curious_server"], by["eavesdropper"]
    assert server.level == wire.level == "most"
    assert server.attack == "inv at k=0" and server.advantage == pytest.approx(0.85)
    assert (server.advantage_lo, server.advantage_hi) == (pytest.approx(0.83), pytest.approx(0.87))
    assert server.cheapest == "dxp (eta=30) at k=0" and server.cheapest_cost == pytest.approx(0.12)
    assert server.cheapest_cost_lo < 0.12 < server.cheapest_cost_hi
    assert wire.cheapest == "encryption at k=0" and wire.cheapest_cost == pytest.approx(0.0)
    # the server decrypts: encryption does not address it, and is listed as such rather than judged
    assert server.not_addressed == ("encryption",) and wire.not_addressed == ()


def test_none_tested_when_no_setting_reaches_little(tmp_path):
    rows = [r for r in sweep_rows() if r["defense"] in ("none", "nopeek")]
    [server, wire] = training_rows(_frame(tmp_path, rows))
    assert server.cheapest is None and wire.cheapest is None
    assert cheapest_text(server) == "none tested"


def test_a_setting_checked_only_by_weaker_attacks_is_never_called_sufficient(tmp_path):
    # the strongest attack undefended ('prefix') did not run against dxp: dxp eta=30 stops only the weaker ones
    rows = sweep_rows() + [cell(f"prefix-{k}", k, "curious_server", "prefix", "none", acc=1.0, loss=3.0 + 0.1 * k)
                           for k in (0, 1, 2)]
    server = training_rows(_frame(tmp_path, rows))[0]
    assert server.attack.startswith("prefix at") and server.cheapest is None
    assert "dxp (eta=30) at k=0 reaches little only against weaker attacks: prefix did not run there" in server.note
    # once it ran there and failed, the setting counts
    rows += [cell(f"dxp30-prefix-{k}", k, "curious_server", "prefix", "dxp", {"eta": 30}, acc=0.12,
                  loss=3.0 + 0.1 * k + math.log(1.12)) for k in (0, 1, 2)]
    server = training_rows(_frame(tmp_path / "b", rows))[0]
    assert server.cheapest == "dxp (eta=30) at k=0" and server.note == ""


def _dxp_case(tmp_path, loss_halfwidth):
    """The issue's case: dxp costs +54 % perplexity, its own interval [+22 %, +95 %] excludes 0, yet its loss
    interval overlaps the undefended one; leakage unchanged."""
    base = 3.0
    rows = [cell("b", 1, "curious_server", "blind", "none", acc=0.1, loss=base),
            cell("n", 1, "curious_server", "inv", "none", acc=0.9, loss=base),
            cell("d", 1, "curious_server", "inv", "dxp", {"eta": 360}, acc=0.9, loss=base + math.log(1.54))]
    lo, hi = math.log(1.22), math.log(1.95)
    rows[2].update(utility_lo=base + lo, utility_hi=base + hi)
    rows[1].update(utility_lo=base - loss_halfwidth, utility_hi=base + loss_halfwidth)
    return settings(_frame(tmp_path, rows))


def test_acted_from_the_paired_cost_interval_the_issues_dxp_case(tmp_path):
    s = _dxp_case(tmp_path, loss_halfwidth=0.5)
    d = s[s["defense"] == "dxp"].iloc[0]
    none = s[s["is_none"]].iloc[0]
    assert d["loss_lo"] < none["loss_hi"]  # the loss intervals overlap: the old rule said "did not act"
    assert (d["cost_lo"], d["cost"], d["cost_hi"]) == (pytest.approx(0.22), pytest.approx(0.54), pytest.approx(0.95))
    assert d["acted"] is True
    assert "acted on utility only" in d["act_note"]


def test_did_not_act_when_cost_and_leakage_intervals_include_no_change(tmp_path):
    s = settings(_frame(tmp_path, sweep_rows()))
    nopeek = s[s["defense"] == "nopeek"]
    assert (nopeek["acted"] == False).all()  # noqa: E712
    assert "its cost interval includes 0" in nopeek["act_note"].iloc[0]
    # a leakage interval that leaves out the undefended leakage is an act, even at no cost
    rows = [{**r, "token_accuracy": r["token_accuracy"] - 0.1, "adv_token_accuracy": r["adv_token_accuracy"] - 0.1,
             "adv_token_accuracy_lo": r["adv_token_accuracy_lo"] - 0.1,
             "adv_token_accuracy_hi": r["adv_token_accuracy_hi"] - 0.1} if r["defense"] == "nopeek" else r
            for r in sweep_rows()]
    s = settings(_frame(tmp_path / "b", rows))
    assert (s[s["defense"] == "nopeek"]["acted"] == True).all()  # noqa: E712


def test_at_most_three_sentences_and_depth_is_named(tmp_path):
    frame = _frame(tmp_path, _with_encryption_report(sweep_rows()))
    rows = training_rows(frame)
    st = settings(frame)
    words = key_sentences(rows, st)
    assert 1 <= len(words) <= MAX_SENTENCES
    assert words[0].startswith("Depth does not protect: without a defense the strongest attack recovers "
                               "0.95 / 0.90 / 0.70 of the tokens at k=0 / k=1 / k=2")
    assert any("nopeek (alpha=0.5) did not act at this budget" in w for w in words)


def test_page_one_is_the_verdict_table_and_fits_on_one_page(tmp_path):
    pdf = build_report(write_store(tmp_path, _with_encryption_report(sweep_rows())))
    first, second = _page_text(pdf, 0), _page_text(pdf, 1)
    assert "1. Verdict" in first
    for header in ("Threat", "Level", "Strongest attack", "Cheapest tested setting reaching little or none",
                   "Not addressed by"):
        assert header in first
    assert first.count("curious_server") >= 1 and "dxp (eta=30) at k=0: +12 % [+11 %, +13 %] perplexity" in first
    assert "encryption at k=0: +0 %" in first
    assert "Depth does not protect" in first
    # everything page 1 holds ends on page 1: its last paragraph is there, the details start on page 2
    assert "Details: the next page and section 4." in first
    assert second.split("page 2 ", 1)[-1].startswith("Verdict per threat, in words")
    assert "Verdict per threat, in words" not in first
    # the words no longer judge a defense against a threat it does not address
    assert "No tested setting of encryption brings curious_server" not in second


def test_page_one_names_none_tested(tmp_path):
    rows = [r for r in sweep_rows() if r["defense"] in ("none", "nopeek")]
    first = _page_text(build_report(write_store(tmp_path, rows)), 0)
    assert first.count("none tested") == 2


def test_a_new_section_adds_its_rows_with_one_provider(tmp_path, monkeypatch):
    def inference(frame):
        return from_dicts([{"section": "inference", "threat": "curious_server", "level": "partial",
                            "attack": "prompt_inversion at k=1", "advantage": 0.3, "advantage_lo": 0.2,
                            "advantage_hi": 0.4, "cheapest": None, "cheapest_cost": None}])

    from reports import report

    monkeypatch.setattr(report, "PAGE_ONE", [*report.PAGE_ONE, inference])
    first = _page_text(build_report(write_store(tmp_path, sweep_rows())), 0)
    assert "Section" in first and "inference" in first and "prompt_inversion at k=1" in first
    assert "training" in first


def test_depth_table_has_bleu_rouge_l_token_accuracy_with_intervals_and_blind(tmp_path):
    frame = _frame(tmp_path, sweep_rows())
    depth = tables.leakage_by_split(frame)
    assert sorted(depth["head_blocks"].unique()) == [0, 1, 2]
    assert set(depth["attack"]) == {"inv", "grad", "wire", "blind"}
    inv2 = depth[(depth["attack"] == "inv") & (depth["head_blocks"] == 2)].iloc[0]
    assert (inv2["token_accuracy_lo"], inv2["token_accuracy"], inv2["token_accuracy_hi"]) == (
        pytest.approx(0.58), pytest.approx(0.60), pytest.approx(0.62))
    assert inv2["bleu4_hi"] == pytest.approx(62) and inv2["rougeL_lo"] == pytest.approx(58)
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(build_report(tmp_path)).pages).split())
    assert "ROUGE-L [95 % CI]" in text and "Token accuracy [95 % CI]" in text
    assert "0.600 [0.580, 0.620]" in text


def test_dp_clip_from_a_quantile_of_the_public_heads_output_norms():
    from defenses.dp import GaussianDPDefense
    from suite.engine.models import tiny_model
    from suite.engine.split import SplitSpec, position_ids_for, split_model
    from suite.errors import ConfigError
    from suite.interfaces.defense import make_defense, public_defense

    base = tiny_model("llama")
    head = split_model(base.model, SplitSpec(1, 1)).client_head
    ids = torch.randint(5, 100, (16, 8))
    mask = torch.ones(16, 8, dtype=torch.long)
    mask[::3, 5:] = 0
    with torch.no_grad():
        out = head(ids, mask, position_ids_for(mask)) * mask.unsqueeze(-1)
    norms = out.flatten(1).norm(dim=1)
    d = make_defense("dp_gaussian", {"sigma": 0.01, "clip_quantile": 0.5})
    assert isinstance(d, GaussianDPDefense)
    with pytest.raises(ConfigError, match="clip_quantile needs public text"):
        d.install(None)
    d.calibrate(head, ids, mask)
    assert d.config.clip == pytest.approx(float(torch.quantile(norms.double(), 0.5)), rel=1e-5)
    # the calibrated clip is public: the attacker's instance holds the same number
    assert public_defense(d).config.clip == d.config.clip
    assert d.report()["clip"] == d.config.clip and d.report()["clip_quantile"] == 0.5
    with pytest.raises(ConfigError, match="clip_quantile must be in"):
        make_defense("dp_gaussian", {"clip_quantile": 1.5})


def test_the_dp_epsilon_of_every_point_where_it_is_a_guarantee(tmp_path):
    held = {"epsilon": 3.2, "delta": 1e-5, "guarantee": "per record, (ε, δ = 1e-05)"}
    trained = {"epsilon": math.inf, "guarantee": "none: the head trained on the private data (freeze = false)"}
    reports = {10: held, 30: trained}
    rows = [{**r, "defense_report": reports.get(r["defense_params"].get("eta"), {})} if r["defense"] == "dxp" else r
            for r in sweep_rows()]
    s = settings(_frame(tmp_path, rows)).set_index(["threat_label", "defense_label", "head_blocks"])
    assert s.loc[("curious_server", "dxp (eta=10)", 1), "guarantee"] == "ε = 3.2 (δ = 1e-05)"
    assert s.loc[("curious_server", "dxp (eta=30)", 1), "guarantee"] == (
        "no guarantee: the head trained on the private data (freeze = false)")
    assert s.loc[("curious_server", "dxp (eta=100)", 1), "guarantee"] == ""
    text = " ".join(" ".join(p.extract_text() for p in PdfReader(build_report(tmp_path)).pages).split())
    assert "dxp (eta=10); ε = 3.2 (δ = 1e-05)" in text
    # page 1 quotes it with the cheapest setting
    assert "dxp (eta=30) at k=0 (no guarantee: the head trained on the private data (freeze = false))" in \
        _page_text(tmp_path / "report.pdf", 0)


def test_the_matrix_runner_calibrates_the_clip_on_shadow_text_before_training():
    from suite.engine.models import tiny_model
    from suite.engine.split import SplitSpec
    from suite.experiment.cell import train_split
    from suite.experiment.config import parse_config
    from suite.interfaces.defense import make_defense

    cfg = parse_config({"model": {"name": "tiny-llama"},
                        "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
                                 "shadow": {"generator": "records", "size": 16, "seed": 2}},
                        "training": {"clients": 2, "steps": 1, "batch_size": 2}})
    trained = train_split(cfg, SplitSpec(1, 1), tiny_model("llama"),
                          defense=make_defense("dp_gaussian", {"sigma": 0.01, "clip_quantile": 0.5}))
    d = trained.defense
    assert d.calibrated and d.config.clip != 1.0 and d.config.clip > 0
    assert d.report()["clip"] == d.config.clip and math.isfinite(d.report()["epsilon"])


def test_a_defense_that_did_not_act_names_the_budget_at_which_it_was_measured_to_act(tmp_path):
    """Where a defense's report says where it was measured to act (``acts_from``), page 1's sentence and the
    per-threat verdict add it to "did not act at this budget"; without it the sentence is unchanged."""
    acts = "on SmolLM2-135M at k = 1 it acts from ~100 training steps (BENCHMARKS)"
    rows = [{**r, "defense_report": {**r["defense_report"], "acts_from": acts}} if r["defense"] == "nopeek" else r
            for r in sweep_rows()]
    frame = _frame(tmp_path, _with_encryption_report(rows))
    st = settings(frame)
    assert (st[st["defense"] == "nopeek"]["acted"] == False).all()  # noqa: E712
    words = key_sentences(training_rows(frame), st, "6 training steps")
    idle = next(w for w in words if "did not act" in w)
    assert idle.startswith("nopeek (alpha=0.5) did not act at this budget of 6 training steps (dCor")
    assert f"; {acts}: this run cannot tell whether it helps" in idle
    text = " ".join(threat_verdict(st[st["threat_label"] == "curious_server"])[1])
    assert f"; {acts}: this run cannot tell whether nopeek helps against curious_server." in text
    plain = key_sentences(training_rows(_frame(tmp_path / "b", _with_encryption_report(sweep_rows()))),
                          settings(_frame(tmp_path / "b", _with_encryption_report(sweep_rows()))), "6 training steps")
    assert not any("acts from" in w for w in plain)
