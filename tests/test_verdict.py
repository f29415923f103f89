"""Verdicts and the privacy-utility frontier from hand-written stores: the cheapest setting that reaches
'little' (or the sentence that none does), 'did not act', the strongest attack over everything a threat sees,
levels on the advantage over blind with its interval, the frontier figure's points and error bars, and the
report built from a store with sweeps."""

import pytest
from matplotlib.container import ErrorbarContainer
from pypdf import PdfReader
from synthetic_store import cell, sweep_rows, write_store

from reports import figures, tables
from reports.frontier import pareto, settings
from reports.report import TITLES, build_report
from reports.verdict import level, still_leaks, threat_verdict
from suite.experiment.store import load_results


def _settings(tmp_path, rows):
    return settings(tables.prepare(load_results(write_store(tmp_path, rows))))


def _verdict(s, threat):
    return threat_verdict(s[s["threat_label"] == threat])


def test_levels_are_set_on_the_upper_end_of_the_interval():
    assert [level(x) for x in (None, 0.0, 0.019, 0.02, 0.099, 0.1, 0.49, 0.5, 1.0)] == [
        "unknown", "none", "none", "little", "little", "partial", "partial", "most", "most"]
    assert still_leaks(0.1) and not still_leaks(0.09) and not still_leaks(None)


def test_verdict_names_the_cheapest_setting_that_reaches_little(tmp_path):
    lvl, words = _verdict(_settings(tmp_path, sweep_rows()), "curious_server")
    text = " ".join(words)
    assert lvl == "most"
    # eta=10 also reaches... no: it stays partial (advantage 0.20); eta=100 is cheaper but leaks; eta=30 is it
    assert ("Cheapest tested setting that reaches little or none: dxp (eta=30) at k=0 (also at k=1, k=2) brings every "
            "attack to little (advantage 0.03 [0.01, 0.05]) at +12 % held-out perplexity [+11 %, +13 %]") in text
    assert "No tested setting of encryption brings curious_server below most." in text
    # the eavesdropper is stopped for free by encryption, and dxp is named as its own option
    _, words = _verdict(_settings(tmp_path / "b", sweep_rows()), "eavesdropper")
    text = " ".join(words)
    assert "Cheapest tested setting that reaches little or none: encryption at k=0" in text
    assert "With dxp: dxp (eta=30) at k=0" in text


def test_cost_quotes_the_centralised_reference_when_the_store_has_it(tmp_path, monkeypatch):
    import math

    from suite.experiment import store

    monkeypatch.setitem(store.COLUMNS, "utility_centralised", "REAL")  # a store from work that adds the column
    rows = [{**r, "utility_centralised": 3.0 - math.log(1.25)} for r in sweep_rows()]  # ppl(k=0) is 25 % above
    _, words = _verdict(_settings(tmp_path, rows), "curious_server")
    assert "+12 % held-out perplexity [+11 %, +13 %] (+40 % vs centralised)" in " ".join(words)


def test_verdict_says_when_no_setting_reaches_little(tmp_path):
    acting = {"dcor_first": 0.99, "dcor_last10_mean": 0.55}  # NoPeek acted: dCor fell
    rows = [r for r in sweep_rows() if r["defense"] not in ("dxp", "encryption")]
    rows = [{**r, "defense_report": acting, "token_accuracy": 0.45, "adv_token_accuracy": 0.35,
             "adv_token_accuracy_lo": 0.33, "adv_token_accuracy_hi": 0.37} if r["defense"] == "nopeek" else r
            for r in rows]
    lvl, words = _verdict(_settings(tmp_path, rows), "curious_server")
    text = " ".join(words)
    assert "No tested setting brings curious_server below partial." in text
    assert "No tested setting of nopeek brings curious_server below partial." in text
    assert "did not act" not in text and "Cheapest" not in text


def test_a_defense_that_did_not_act_is_said_so_never_does_not_help(tmp_path):
    s = _settings(tmp_path, sweep_rows())
    nopeek = s[s["defense"] == "nopeek"]
    assert (nopeek["acted"] == False).all()  # noqa: E712
    assert (s[s["defense"] == "dxp"]["acted"] == True).all()  # noqa: E712
    _, words = _verdict(s, "curious_server")
    text = " ".join(words)
    assert ("nopeek (alpha=0.5) did not act at this budget at k=0, k=1, k=2 (dCor 0.9995 → 0.9989 (unchanged); "
            "its cost interval includes 0 and every leakage interval the undefended leakage)") in text
    assert "does not help" not in text and "No tested setting of nopeek" not in text


def test_a_defense_whose_trace_moved_acted_even_without_effect(tmp_path):
    moved = {"dcor_first": 0.99, "dcor_last10_mean": 0.60}
    rows = [{**r, "defense_report": moved} if r["defense"] == "nopeek" else r for r in sweep_rows()]
    s = _settings(tmp_path, rows)
    assert (s[s["defense"] == "nopeek"]["acted"] == True).all()  # noqa: E712
    assert "No tested setting of nopeek brings curious_server below most." in " ".join(_verdict(s, "curious_server")[1])


def test_leakage_is_the_strongest_attack_over_everything_the_threat_sees(tmp_path):
    # at k=2 the gradient attack (0.70) beats the activation attack (0.60); under dxp eta=100 too
    rows = sweep_rows() + [
        # an adaptive attacker that beats its non-adaptive twin under dxp eta=10
        cell("adapt", 1, "curious_server", "inv", "dxp", {"eta": 10}, acc=0.55, loss=3.1, adaptive=1,
             aparams={"adaptive": True}),
    ]
    s = _settings(tmp_path, rows)
    at = s.set_index(["threat_label", "defense_label", "head_blocks"])
    assert at.loc[("curious_server", "none", 2), "attack_label"] == "grad"
    assert at.loc[("curious_server", "none", 2), "leak"] == pytest.approx(0.60)
    assert at.loc[("curious_server", "dxp (eta=10)", 1), "leak"] == pytest.approx(0.45)
    assert bool(at.loc[("curious_server", "dxp (eta=10)", 1), "adaptive"]) is True
    assert at.loc[("curious_server", "dxp (eta=10)", 1), "n_attacks"] == 3


def test_levels_use_the_advantage_over_blind_and_its_interval(tmp_path):
    def rows(raw, lo, hi):
        base = [cell("b", 1, "curious_server", "blind", "none", acc=0.40, loss=3.0),
                cell("a", 1, "curious_server", "inv", "none", acc=0.95, loss=3.0),
                cell("d", 1, "curious_server", "inv", "dxp", {"eta": 1}, acc=raw, loss=3.1)]
        base[2].update(adv_token_accuracy=raw - 0.40, adv_token_accuracy_lo=lo, adv_token_accuracy_hi=hi)
        return base

    # 45 % of tokens right, but the blind attack gets 40 %: the defense leaves only blind-guessable tokens
    s = _settings(tmp_path / "a", rows(0.45, 0.03, 0.07))
    assert level(s[s["defense"] == "dxp"]["leak_hi"].iloc[0]) == "little"
    assert "Cheapest tested setting that reaches little or none: dxp (eta=1) at k=1" in " ".join(_verdict(s, "curious_server")[1])
    # the same mean with a wider interval reaching above the band is not little
    s = _settings(tmp_path / "b", rows(0.45, 0.01, 0.12))
    assert level(s[s["defense"] == "dxp"]["leak_hi"].iloc[0]) == "partial"
    assert "No tested setting brings curious_server below partial." in " ".join(_verdict(s, "curious_server")[1])


def test_old_store_without_intervals_or_blind_reads_the_raw_metric(tmp_path):
    s = _settings(tmp_path, sweep_rows(adv=False, intervals=False))
    assert set(s["kind"]) == {"raw"}
    _, words = _verdict(s, "curious_server")
    text = " ".join(words)
    assert "token accuracy 0.95, no blind baseline" in text
    assert "No tested setting brings curious_server below partial." in text  # raw 0.13 under eta=30
    # without intervals, equal leakage and utility still make nopeek a 'did not act'
    assert "nopeek (alpha=0.5) did not act at this budget" in text


def test_a_swept_training_budget_is_its_own_setting(tmp_path):
    """A store with steps swept: each budget is a setting of its own in the frontier and the
    verdict, never averaged with the others."""
    rows = []
    for i, (steps, acc) in enumerate(((0, 0.95), (50, 0.30))):
        for attack, a in (("inv", acc), ("blind", 0.1)):
            rows.append({**cell(f"{attack}{i}", 1, "curious_server", attack, "none", acc=a, loss=3.0 + i),
                         "steps": steps})
    s = _settings(tmp_path, rows)
    assert sorted(s["defense_label"]) == ["none [steps=0]", "none [steps=50]"]
    by = dict(zip(s["defense_label"], s["raw"], strict=True))
    assert by["none [steps=0]"] == pytest.approx(0.95) and by["none [steps=50]"] == pytest.approx(0.30)


def test_pareto_frontier():
    import pandas as pd

    pts = pd.DataFrame({"cost": [0.0, 0.1, 0.2, 0.3, None], "leak": [0.8, 0.5, 0.6, 0.0, 0.0]})
    assert list(pareto(pts)) == [True, True, False, True, False]


def test_frontier_figure_has_three_points_per_swept_defense_with_error_bars(tmp_path):
    s = _settings(tmp_path, [r for r in sweep_rows() if r["head_blocks"] == 1])
    fig = figures.frontier_figure(s[s["threat_label"] == "curious_server"])
    ax = next(a for a in fig.axes if a.get_title() == "dxp")
    points = []
    for c in ax.containers:
        assert isinstance(c, ErrorbarContainer) and c.has_xerr and c.has_yerr
        line, _, bars = c.lines
        color = tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
        if color == "0.55":  # no defense, for reference
            continue
        xs, ys = line.get_xdata(), line.get_ydata()
        yerr = bars[1].get_segments()  # vertical bars: one segment per point
        points += [(float(x), float(y), seg[1][1] - seg[0][1]) for x, y, seg in zip(xs, ys, yerr, strict=True)]
    assert sorted((round(x), round(y, 2)) for x, y, _ in points) == [(3, 0.5), (12, 0.03), (40, 0.2)]
    assert all(h == pytest.approx(0.04) for _, _, h in points)  # the 95 % interval [leak - 0.02, leak + 0.02]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["no defense", "eta=10", "eta=30", "eta=100"]
    assert "Pareto frontier" in legend and "blind (advantage 0)" in legend
    frontier = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"][0]
    assert sorted(round(float(x)) for x in frontier.get_xdata()) == [0, 3, 12]  # eta=10 is dominated by eta=30


def test_report_from_a_store_with_sweeps(tmp_path):
    rows = sweep_rows() + [cell("adapt", 1, "curious_server", "inv", "dxp", {"eta": 10}, acc=0.55, loss=3.1,
                                adaptive=1, aparams={"adaptive": True}),
                           cell("plain", 1, "curious_server", "inv", "dxp", {"eta": 10}, acc=0.30, loss=3.1,
                                adaptive=0, aparams={"adaptive": False})]
    pdf = build_report(write_store(tmp_path, rows))
    pages = [p.extract_text() for p in PdfReader(pdf).pages]
    first = " ".join(pages[0].split())
    assert "dxp (eta=30) at k=0: +12 %" in first  # page 1: the verdict table
    assert "nopeek (alpha=0.5) did not act at this budget" in first
    words = " ".join(pages[1].split())  # page 2: the verdict in words
    assert "Cheapest tested setting that reaches little or none: dxp (eta=30) at k=0" in words
    assert "does not help" not in first + words
    text = " ".join(" ".join(pages).split())
    for title in TITLES:
        assert title in text
    assert "Adaptive versus non-adaptive attackers" in text
    # samples: the deepest split that still leaks (k=2, where the gradient attack is strongest), not k=0
    assert "curious_server: deepest split that still leaks, no defense — grad at k=2" in text
    assert "guess grad-2 k=2" in text and "guess inv-0 k=0" not in text
