"""The PDF report: builds from real and hand-written stores (partial axes, failures, no PII, nothing at all),
is a valid PDF with every section, words the verdict by its rule and escapes untrusted text."""

import pytest
from pypdf import PdfReader

from reports.markup import escape, highlight, sample_markup
from reports.report import TITLES, build_report
from suite.cli import main
from suite.experiment.config import parse_config
from suite.experiment.schedule import run_matrix
from suite.experiment.store import ResultsStore

PII_NAME = 'Bob <"Al"> & Co'
CONFIG = {"model": {"name": "m"}, "data": {"max_length": 8}, "training": {"steps": 2}}


def _row(key, k, threat, attack, defense, dparams=None, *, acc=0.8, pii=True, utility=5.0, samples=True,
         error=None):
    row = {"key": key, "model": "m", "revision": "r1", "head_blocks": k, "tail_blocks": 1, "strategy": "serial",
           "threat": threat, "attack": attack, "attack_params": {}, "defense": defense,
           "defense_params": dparams or {}, "seed": 0, "config": CONFIG, "versions": {"python": "3.11", "torch": "2"}}
    if error:
        return {**row, "status": "failed", "error": error}
    row.update(bleu4=90 * acc, rouge1=100 * acc, rouge2=80 * acc, rougeL=95 * acc, token_accuracy=acc,
               exact_match=acc / 2, pii_recovery=acc / 2 if pii else None, utility=utility, attack_seconds=0.25,
               attack_peak_rss_mib=321.0, status="ok", error=None, note="")
    if samples:
        fields = {"name": [PII_NAME, acc > 0.5], "phone": ["+1 555-0100", False]} if pii else {}
        row["samples"] = [{"reference": f"Dear {PII_NAME}, call +1 555-0100 \x07now",
                           "reconstruction": f"Dear {PII_NAME if acc > 0.5 else 'Bob'}, call",
                           "pii": fields}]
    return row


def _store(path, rows):
    with ResultsStore(path) as store:
        for row in rows:
            store.write(row)
    return path


def _text(pdf) -> str:
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    return "\n".join(page.extract_text() for page in PdfReader(pdf).pages)


def test_report_from_a_matrix_run(tmp_path):
    cfg = parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 16, "seed": 2}},
        "training": {"clients": 2, "steps": 1, "batch_size": 2},
        "matrix": {"splits": [1], "threats": ["curious_server", "eavesdropper"],
                   "attacks": ["nearest_embedding", "wire_inversion"], "defenses": ["none"]},
    })
    run_matrix(cfg, tmp_path)
    pdf = build_report(tmp_path)
    assert pdf == tmp_path / "report.pdf"
    text = _text(pdf)
    for title in TITLES:
        assert title in text
    assert "curious_server" in text and "eavesdropper" in text and "tiny-llama" in text


def test_report_words_the_verdict_and_escapes_untrusted_text(tmp_path):
    rows = [
        _row("a", 0, "curious_server", "inv", "none", acc=0.97),
        _row("b", 1, "curious_server", "inv", "none", acc=0.6),
        _row("c", 0, "curious_server", "inv", "noise", {"sigma": 0.5}, acc=0.02, utility=5.5),
        _row("d", 0, "curious_server", "inv", "seal", acc=0.96),
        _row("e", 0, "eavesdropper", "wire", "none", acc=0.3),
        _row("f", 0, "eavesdropper", "wire", "seal", error="RuntimeError: <boom> & bust"),
    ]
    text = " ".join(_text(build_report(_store(tmp_path, rows))).split())
    for title in TITLES:
        assert title in text
    assert "MOST" in text and "PARTIAL" in text
    assert "inv, reaches most at k=0 (token accuracy 0.97, no blind baseline; 97% of tokens)" in text
    assert ("Cheapest tested setting that reaches little or none: noise (sigma=0.5) at k=0 brings every attack to little "
            "(token accuracy 0.02, no blind baseline) at +65 % held-out perplexity") in text
    assert "seal did not act at this budget at k=0 (utility and leakage equal to no defense (no intervals" in text
    assert "does not help" not in text
    assert "RuntimeError: <boom> & bust" in text  # failed cells show their error, escaped
    assert PII_NAME in text  # PII values with markup characters print as written
    assert "python 3.11" in text and "max_length=8" in text  # versions and config on the first page


@pytest.mark.parametrize("case", ["failed_and_no_pii", "one_split_no_utility", "all_failed", "empty"])
def test_report_handles_partial_stores(tmp_path, case):
    rows = {
        "failed_and_no_pii": [
            _row("a", 1, "curious_server", "inv", "none", pii=False),
            _row("b", 1, "curious_server", "inv", "noise", {"sigma": 1.0}, error="ValueError: nan"),
            _row("c", 1, "eavesdropper", "wire", "none", error="RuntimeError: inverter exploded"),
        ],
        "one_split_no_utility": [
            _row("a", 2, "mystery_threat", "inv", "seal", utility=None, samples=False),
        ],
        "all_failed": [
            _row("a", 0, "curious_server", "inv", "none", error="RuntimeError: first"),
            _row("b", 1, "eavesdropper", "wire", "none", error="RuntimeError: second"),
        ],
        "empty": [],
    }[case]
    text = _text(build_report(_store(tmp_path, rows)))
    for title in TITLES:
        assert title in text
    if case == "failed_and_no_pii":
        assert "inverter exploded" in text and "ValueError: nan" in text
    if case == "all_failed":
        assert "UNKNOWN" in text and "No finished cells: no costs measured." in text
    if case == "empty":
        assert "holds no cells yet" in text


def test_report_command(tmp_path, capsys):
    _store(tmp_path, [_row("a", 0, "curious_server", "inv", "none")])
    assert main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report.pdf") in capsys.readouterr().out
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_markup_escapes_and_highlights():
    assert escape('a<b>&"c"\x00\nd') == "a&lt;b&gt;&amp;&quot;c&quot; d"
    marked = highlight("x <y> z <y>", [("<y>", "[{}]")])
    assert marked == "x [&lt;y&gt;] z [&lt;y&gt;]"
    ref, hyp = sample_markup({"reference": "Ann & Bo at 555", "reconstruction": "Ann & Bo",
                              "pii": {"name": ["Ann & Bo", True], "phone": ["555", False]}})
    assert "<b>Ann &amp; Bo</b>" in ref and "<u>555</u>" in ref and "<b>Ann &amp; Bo</b>" in hyp
    assert sample_markup({"reference": None, "reconstruction": "<", "pii": None}) == ("", "&lt;")
