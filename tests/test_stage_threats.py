"""Stage threats (``curious_stage``, ``malicious_stage``, ``colluding_stages``): names and sweeps, what a stage
observes (its own inbox, at its own depth), a malicious stage's policy on that stage, and a matrix with
``stages = 4`` writing rows."""

import pytest
import torch

from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.cell import stage_view, train_split
from suite.experiment.config import parse_config
from suite.experiment.plan import expand, threat_names
from suite.experiment.schedule import run_matrix
from suite.experiment.store import load_results
from suite.interfaces.presets import get_threat


def _cfg(threats, stages=4, attacks=("nearest_embedding",), splits=(0,), tail=0, steps=2):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "held_out": 4, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 16, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 2, "stages": stages},
        "matrix": {"splits": list(splits), "tail_blocks": tail, "threats": list(threats), "attacks": list(attacks),
                   "defenses": ["none"], "blind": False},
    })


def test_stage_threat_names_parse_and_refuse_bad_indices():
    assert get_threat("curious_stage:2").stages == (2,)
    assert get_threat("colluding_stages:2,0").name == "colluding_stages:0,2"
    for bad in ("curious_stage", "curious_stage:x", "colluding_stages:1", "colluding_stages:1,1", "curious_server:1"):
        with pytest.raises(ConfigError, match="stage"):
            get_threat(bad)


def test_the_stage_index_is_a_sweep_and_is_checked_against_stages():
    cfg = _cfg([{"name": "curious_stage", "stage": [0, 1, 3]}, "colluding_stages:0,2"])
    assert threat_names(cfg) == ["curious_stage:0", "curious_stage:1", "curious_stage:3", "colluding_stages:0,2"]
    with pytest.raises(ConfigError, match=r"matrix.threats\[0\]: threat curious_stage:4 names stage 4"):
        threat_names(_cfg([{"name": "curious_stage", "stage": [0, 4]}]))
    with pytest.raises(ConfigError, match="takes 'name' and 'stage'"):
        threat_names(_cfg([{"name": "curious_stage", "index": 1}]))
    cells, skipped = expand(_cfg(["malicious_server"], attacks=["tampering"]))
    assert not cells and "use malicious_stage" in skipped[0][1]


def test_a_stage_sees_its_own_inputs_and_gradients_at_its_own_depth():
    cfg = _cfg(["curious_stage:1"])
    from suite.engine.models import tiny_model

    trained = train_split(cfg, SplitSpec(0, 0), tiny_model("llama"), reference=False)
    cap = trained.capture
    assert set(cap.stage_batches) == {0, 1, 2, 3}
    # stage 0's inputs are what the heads sent (the whole server's view); stage 1's are one block deeper
    for whole, first, second in zip(cap.batches, cap.stage_batches[0], cap.stage_batches[1], strict=True):
        assert torch.equal(whole.hidden, first.hidden)
        assert not torch.allclose(first.hidden, second.hidden)
    # the last stage receives the tails' gradients: the whole server's gradient view
    assert all(torch.equal(w.gradient, last.gradient) for w, last in zip(cap.batches, cap.stage_batches[3],
                                                                           strict=True))
    model = trained.prepared.session.split
    chain = trained.prepared.session.server
    x = cap.stage_batches[0][0]
    with torch.no_grad():
        expect = chain.stages[0].trunk(x.hidden, x.attention_mask, torch.arange(x.hidden.shape[1]).expand_as(
            x.attention_mask))
    assert torch.allclose(expect, cap.stage_batches[1][0].hidden, atol=1e-6)
    view, spec = stage_view(cap, get_threat("curious_stage:1"), model.spec, 4, 4)
    assert spec == SplitSpec(1, 2) and view.batches[0].hidden is cap.stage_batches[1][0].hidden
    view, spec = stage_view(cap, get_threat("colluding_stages:0,2"), model.spec, 4, 4)
    assert spec == SplitSpec(0, 1)
    assert torch.equal(view.batches[0].hidden, cap.stage_batches[0][0].hidden)
    assert torch.equal(view.batches[0].gradient, cap.stage_batches[2][0].gradient)


def test_a_malicious_stage_tampers_on_its_stage_only():
    cfg = _cfg(["malicious_stage:1"], attacks=[{"name": "tampering", "target": "both", "rate": 1.0}], steps=1)
    from suite.engine.models import tiny_model
    from suite.interfaces.attack import make_attack

    threat = get_threat("malicious_stage:1")
    attack = make_attack("tampering", threat, {"target": "both", "rate": 1.0})
    trained = train_split(cfg, SplitSpec(0, 0), tiny_model("llama"), threat, attack, reference=False)
    chain = trained.prepared.session.server
    assert chain.stages[1].policy is attack.policy
    assert all(s.policy is None for i, s in enumerate(chain.stages) if i != 1)
    assert ("hidden" in {w for _, w in attack.policy.tampered}) and ("gradient" in {w for _, w in attack.policy.tampered})
    # stage 2 received stage 1's flipped output: its input is the negated honest one
    cap = trained.capture
    x = cap.stage_batches[1][0]
    pos = torch.arange(x.hidden.shape[1]).expand_as(x.attention_mask)
    with torch.no_grad():
        honest = chain.stages[1].trunk(x.hidden, x.attention_mask, pos)
    assert torch.allclose(cap.stage_batches[2][0].hidden, -honest, atol=1e-5)


def test_a_matrix_with_four_stages_writes_rows_and_the_report_shows_the_pipeline_section(tmp_path):
    cfg = _cfg(["curious_server", {"name": "curious_stage", "stage": [0, 3]}, "colluding_stages:1,2",
                "malicious_stage:1"], attacks=["nearest_embedding", {"name": "tampering", "rate": 0.5}])
    cfg = cfg.model_copy(update={"matrix": cfg.matrix.model_copy(update={
        "defenses": ["none", {"name": "transition_audit", "rate": 1.0}], "blind": True})})
    run_matrix(cfg, tmp_path)
    df = load_results(tmp_path)
    ok = df[df["status"] == "ok"]
    assert len(ok) == len(df), df[["threat", "attack", "error"]].to_string()
    got = {(r.threat, r.attack): r for r in ok.itertuples()}
    assert {("curious_server", "nearest_embedding"), ("curious_stage:0", "nearest_embedding"),
            ("curious_stage:3", "nearest_embedding"), ("colluding_stages:1,2", "nearest_embedding"),
            ("malicious_stage:1", "tampering")} <= set(got)
    assert (ok["stages"] == 4).all()
    assert got[("curious_stage:3", "nearest_embedding")].stage_block == 3
    assert got[("curious_stage:0", "nearest_embedding")].stage_block == 0
    assert got[("colluding_stages:1,2", "nearest_embedding")].stage == "1,2"
    # stage 0 sees what the whole server sees of the heads: the same inversion
    none = ok[ok["defense"] == "none"]
    got = {(r.threat, r.attack): r for r in none.itertuples()}
    assert got[("curious_stage:0", "nearest_embedding")].token_accuracy == pytest.approx(
        got[("curious_server", "nearest_embedding")].token_accuracy)

    # the audit caught the malicious stage, and every honest run passed it
    audited = ok[ok["defense"] == "transition_audit"]
    reports = {r.threat: r.defense_report for r in audited.itertuples() if r.attack != "blind"}
    assert reports["malicious_stage:1"]["flagged"] >= 1 and reports["malicious_stage:1"]["replacements"]
    assert all(rep["flagged"] == 0 for t, rep in reports.items() if t != "malicious_stage:1")

    from pypdf import PdfReader

    from reports.pipeline import position_table, verdict_rows
    from reports.report import build_report

    rows = verdict_rows(df)
    assert {r["threat"] for r in rows} >= {"curious_stage:0", "curious_stage:3", "colluding_stages:1,2"}
    keys = {"section", "threat", "level", "attack", "advantage", "advantage_lo", "advantage_hi", "cheapest",
            "cheapest_cost"}
    assert all(set(r) == keys and r["section"] == "pipeline" for r in rows)
    assert all(r["level"] in ("none", "little", "partial", "most") for r in rows)
    assert list(position_table(df)["first_block"].drop_duplicates()) == [0, 1, 3]
    text = "\n".join(p.extract_text() for p in PdfReader(build_report(tmp_path)).pages)
    assert "Pipeline stages" in text and "Leakage by stage position" in text and "Detection (transition audit)" in text


def test_fsha_runs_on_stage_0_only(tmp_path):
    """FSHA hijacks the heads through the gradient of the head's output: at S > 1 that is stage 0's to send.
    ``malicious_stage:0`` runs it (and writes a row); any other stage is left out with the reason."""
    from suite.interfaces.attack import make_attack

    with pytest.raises(ConfigError, match="only stage 0 receives and answers; malicious_stage:1 is not stage 0"):
        make_attack("fsha", get_threat("malicious_stage:1"))
    cfg = _cfg(["malicious_stage:0", "malicious_stage:1"], attacks=[{"name": "fsha", "warmup_steps": 2}], stages=3,
               steps=2)
    cells, skipped = expand(cfg)
    assert [(c.threat, c.attack) for c in cells] == [("malicious_stage:0", "fsha")]
    assert any(c.threat == "malicious_stage:1" and "only stage 0" in why for c, why in skipped)
    run_matrix(cfg, tmp_path)
    df = load_results(tmp_path)
    row = df[(df["threat"] == "malicious_stage:0") & (df["attack"] == "fsha")].iloc[0]
    assert row["status"] == "ok", row.get("error")
    assert row["stages"] == 3 and row["stage"] == "0"
