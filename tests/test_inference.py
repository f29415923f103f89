"""Split inference: split generation through the parties and the byte-level wire, each part with
its own KV cache, equals the unsplit model's ``generate`` token for token (greedy), on two families; sampling
is seeded; the server's view (its inbox, its cache) is what a curious server or a memory dump holds."""

import pytest
import torch

from suite.engine.decoding import ClientDecoder, TrunkDecoder
from suite.engine.inference import Sampling, generate
from suite.engine.models import tiny_model
from suite.engine.parties import Batches, Client, Server
from suite.engine.protocol import ActivationMsg
from suite.engine.split import SplitSpec, split_model
from suite.engine.transport import InProcessTransport
from suite.errors import ConfigError, ProtocolError


def _parties(model, k: int, m: int = 1):
    split = split_model(model, SplitSpec(k, m))
    transport = InProcessTransport()
    ids = torch.zeros(1, 4, dtype=torch.long)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    client = Client(0, split.client_head, split.client_tail, Batches(data, 1, 0), transport, lr=0.0)
    server = Server(split.server_trunk, transport, lr=0.0)
    return ClientDecoder(client), TrunkDecoder(server)


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_split_greedy_generation_equals_unsplit_generate(family, k):
    # gemma3's tiny config alternates sliding (window 4) and global layers: the prompt and the generation
    # both run past the window, so every part's sliding cache is exercised
    model = tiny_model(family, num_layers=4).model.eval()
    prompt = _prompt(model.config.vocab_size, 7, seed=k)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, pad_token_id=0)[:, prompt.shape[1]:]
    decoder, trunk = _parties(model, k)
    out, step = generate(decoder, trunk, prompt, 12)
    assert out.tolist() == ref.tolist()
    assert step == 12  # the prompt and 11 tokens crossed the wire; the last token is sampled, never sent


def test_generation_twice_restarts_every_cache():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    a = _prompt(model.config.vocab_size, 5, seed=1)
    first, step = generate(decoder, trunk, a, 6)
    generate(decoder, trunk, _prompt(model.config.vocab_size, 9, seed=2), 6, step=step)
    again, _ = generate(decoder, trunk, a, 6, step=100)
    assert again.tolist() == first.tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    prompt = _prompt(model.config.vocab_size, 5, seed=3)
    s = Sampling(temperature=1.0, seed=7)
    one, _ = generate(decoder, trunk, prompt, 10, s)
    two, _ = generate(decoder, trunk, prompt, 10, s)
    other, _ = generate(decoder, trunk, prompt, 10, Sampling(temperature=1.0, seed=8))
    greedy, _ = generate(decoder, trunk, prompt, 10)
    top1, _ = generate(decoder, trunk, prompt, 10, Sampling(temperature=1.0, top_k=1, seed=8))
    assert one.tolist() == two.tolist()
    assert one.tolist() != other.tolist()
    assert top1.tolist() == greedy.tolist()
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(temperature=-1.0)


def test_server_sees_prompt_then_one_message_per_token_and_keeps_its_cache():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    seen: list[ActivationMsg] = []
    trunk.server.inbox_taps.append(seen.append)
    prompt = _prompt(model.config.vocab_size, 6, seed=4)
    out, _ = generate(decoder, trunk, prompt, 5)
    assert [m.hidden.shape[1] for m in seen] == [6, 1, 1, 1, 1]
    assert seen[0].position_ids.tolist() == [list(range(6))]  # the prompt opens a sequence
    assert all(m.position_ids is None for m in seen[1:])  # each token continues it
    # what the server received is the head output of the whole sequence (the head is causal)
    full = torch.cat([prompt, out[:, :-1]], 1)
    with torch.no_grad():
        split = split_model(model, SplitSpec(1, 1))
        direct = split.client_head(full, torch.ones_like(full), torch.arange(full.shape[1])[None])
    torch.testing.assert_close(torch.cat([m.hidden for m in seen], 1), direct, rtol=1e-5, atol=1e-5)
    keys, values = trunk.kv(0, 1)  # the trunk's first block (global index 1) cached every position it saw
    assert keys.shape[2] == values.shape[2] == full.shape[1]


def test_kv_capture_keeps_the_trunks_first_middle_and_last_blocks():
    from attacks.kv_inversion import pick_layer
    from suite.experiment.inference_cell import kv_layers

    assert kv_layers(12, 2, 2) == (2, 6, 9)  # the trunk is blocks 2..9
    assert kv_layers(4, 1, 1) == (1, 2) and kv_layers(3, 1, 1) == (1,) and kv_layers(2, 1, 1) == ()
    captured = {2: None, 6: None, 9: None}
    assert [pick_layer(captured, w) for w in ("first", "middle", "last")] == [2, 6, 9]
    assert [pick_layer({1: None, 2: None}, w) for w in ("first", "middle", "last")] == [1, 2, 2]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_kv_readout_is_what_the_servers_block_cached_and_steps_like_a_head(family):
    """``KvReadout`` (the reference the KV search verifies on) gives exactly the keys and values the server's
    block cached during a split generation, whole or one position at a time through a cache."""
    from transformers import DynamicCache

    from attacks.kv_inversion import KvReadout

    model = tiny_model(family, num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    prompt = _prompt(model.config.vocab_size, 2, seed=5)  # 2 + 1 positions: what gemma3's window of 4 keeps
    out, _ = generate(decoder, trunk, prompt, 2)
    full = torch.cat([prompt, out[:, :-1]], 1)
    for layer in (1, 2):  # the trunk's first and last blocks
        keys, values = trunk.kv(0, layer)
        cached = torch.cat([keys.permute(0, 2, 1, 3).flatten(2), values.permute(0, 2, 1, 3).flatten(2)], -1)
        readout = KvReadout(model, layer).eval()
        ones = torch.ones_like(full)
        with torch.no_grad():
            whole = readout(full, ones, torch.arange(full.shape[1])[None])
            cache = DynamicCache(config=model.config)
            steps = [readout(full[:, t:t + 1], ones[:, :t + 1], torch.tensor([[t]]), cache=cache)
                     for t in range(full.shape[1])]
        torch.testing.assert_close(whole, cached, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)


def test_kv_search_falls_back_on_the_ridge_map_and_says_so_where_a_sliding_window_dropped_positions(tmp_path):
    """Tiny gemma3's sliding blocks keep a window of 4: a generation's rows are longer, so the search, which
    needs every position, cannot run on them; the ridge map reads the positions kept, and the row says why."""
    from suite.experiment.config import parse_config
    from suite.experiment.schedule import run_matrix
    from suite.experiment.store import load_results

    attacks = [{"name": "kv_inversion", "layer": ["first", "middle"]}]
    cfg = parse_config({**INFER, "model": {"name": "tiny-gemma3"},
                        "matrix": {**INFER["matrix"], "mode": ["inference"], "attacks": attacks,
                                   "threats": ["memory_dump"], "defenses": ["none"]}})
    run_matrix(cfg, tmp_path)
    frame = load_results(tmp_path)
    kv = frame[frame["attack"] == "kv_inversion"]
    kv = kv.set_index(kv["attack_params"].map(lambda p: p["layer"]))
    assert (kv["status"] == "ok").all(), kv["error"].tolist()
    from suite.engine.models import tiny_model

    types = tiny_model("gemma3", num_layers=4).model.config.layer_types
    for which, row in kv.iterrows():
        layer = {"first": 1, "middle": 2}[which]  # the trunk is blocks 1..2 at k = 1, m = 1
        if types[layer] == "sliding_attention":
            assert "ridge map, not the search" in row["note"]
        else:
            assert row["note"] == "" and row["token_accuracy"] >= 0.9


def test_a_token_before_any_prompt_is_refused():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    decoder.start()
    decoder.length = 2  # the client skips its prompt
    decoder.send(0, torch.tensor([[5]]))
    with pytest.raises(ProtocolError, match="without a prompt"):
        trunk.serve([0], 0)


# --- inference cells: the matrix with mode = ["inference"] -------------------------------------------------

INFER = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 10, "private": {"generator": "records", "size": 6, "seed": 1},
             "shadow": {"generator": "records", "size": 24, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
    "inference": {"new_tokens": 6},
    "matrix": {"splits": [1], "threats": ["curious_server", "memory_dump", "eavesdropper"],
               "attacks": ["nearest_embedding", "prefix_inversion", "gradient_inversion", "wire_inversion"],
               "defenses": ["none", "encryption"], "mode": ["training", "inference"]},
}


def test_inference_cells_expand_without_training_time_attacks():
    from suite.experiment.config import parse_config
    from suite.experiment.plan import expand

    cells, skipped = expand(parse_config(INFER))
    inference = {(c.threat, c.attack) for c in cells if c.mode == "inference"}
    assert ("curious_server", "prefix_inversion") in inference
    assert ("eavesdropper", "wire_inversion") in inference  # it reassembles each generation off the wire
    assert "gradient_inversion" not in {a for _, a in inference}
    reasons = {(c.threat, c.attack): r for c, r in skipped if c.mode == "inference"}
    assert "training-time signal" in reasons[("curious_server", "gradient_inversion")]
    training = [c for c in cells if c.mode is None]
    # a training cell's key and label are what they were before the mode axis existed
    assert all("[inference]" not in c.label() for c in training)
    assert {c.training_group() for c in cells if c.mode == "inference"} <= {c.training_group() for c in training}


def test_inference_matrix_writes_prompt_and_response_rows(tmp_path):
    from suite.experiment.config import parse_config
    from suite.experiment.schedule import run_matrix
    from suite.experiment.store import load_results

    attacks = ["nearest_embedding", "prefix_inversion",
               {"name": "kv_inversion", "layer": ["first", "middle", "last"], "method": ["search", "ridge"]},
               {"name": "model_completion", "tail": ["trained", "public"]}, "wire_inversion"]
    cfg = parse_config({**INFER, "matrix": {**INFER["matrix"], "mode": ["inference"], "attacks": attacks,
                                            "threats": ["curious_server", "memory_dump", "eavesdropper"],
                                            "defenses": ["none", "encryption"]}})
    run_matrix(cfg, tmp_path)
    frame = load_results(tmp_path)
    assert set(frame["mode"]) == {"inference"}
    assert (frame["status"] == "ok").all(), frame[["attack", "error"]].to_string()
    none = frame[(frame["defense"] == "none")]
    # the memory dump reads only the cache; the curious server's cache attack does no better than its
    # activation attack on the same generations (the cache is a function of what it received)
    assert set(none[none["threat"] == "memory_dump"]["attack"]) == {"kv_inversion", "blind"}
    best = none[(none["threat"] == "curious_server") & (none["attack"] == "prefix_inversion")].iloc[0]
    kv_rows = none[none["attack"] == "kv_inversion"]
    assert sorted(p["method"] for p in kv_rows["attack_params"]) == ["ridge"] * 6 + ["search"] * 6
    for _, kv in kv_rows.iterrows():
        for part in ("prompt", "response"):
            assert kv[f"{part}_token_accuracy"] <= best[f"{part}_token_accuracy"] + 1e-9
            # the search on the cached keys and values reads as much as the activations; the ridge map reads
            if kv["attack_params"]["method"] == "search":
                assert kv[f"{part}_token_accuracy"] >= 0.9, (kv["attack_params"], part)
            else:
                assert kv[f"{part}_token_accuracy"] > 0.2, (kv["attack_params"], part)
    wire = frame[frame["attack"] == "wire_inversion"].set_index("defense")
    # the eavesdropper reassembles each generation from its frames and reads the plaintext wire; not ciphertext
    assert wire.loc["none", "response_token_accuracy"] > 0.5
    assert wire.loc["encryption", "token_accuracy"] == 0.0 and "ciphertext" in wire.loc["encryption", "note"]
    completion = none[none["attack"] == "model_completion"]
    assert sorted(str(p) for p in completion["attack_params"]) == ["{'tail': 'public'}", "{'tail': 'trained'}"]
    public = completion[completion["attack_params"].map(str) == "{'tail': 'public'}"].iloc[0]
    # the server's own copy of the public tail reads the greedy answer from the hidden states it returned (the
    # random tiny model's 2 LoRA steps barely moved the client's tail); the tail it trains on public records
    # text (the default) is measured too: here it learns a language the random model does not speak
    assert public["response_token_accuracy"] >= 0.8
    prefix = frame[(frame["attack"] == "prefix_inversion") & (frame["defense"] == "none")].iloc[0]
    # the tiny model's head is injective: the strongest attack reads both the prompt and the answer
    assert prefix["prompt_token_accuracy"] >= 0.9 and prefix["response_token_accuracy"] >= 0.9
    assert prefix["prompt_token_accuracy_lo"] <= prefix["prompt_token_accuracy"] <= prefix["prompt_token_accuracy_hi"]
    assert prefix["adv_response_token_accuracy"] > 0.5
    assert prefix["answer_rougeL"] == 100.0 and prefix["bytes_per_token"] > 0
    sample = prefix["samples"][0]
    assert sample["answer"] and "response_reconstruction" in sample
    encrypted = frame[(frame["attack"] == "prefix_inversion") & (frame["defense"] == "encryption")].iloc[0]
    # encryption protects the wire, not the server: the curious server reads as much
    assert encrypted["response_token_accuracy"] == prefix["response_token_accuracy"]
    assert encrypted["bytes_per_token"] > prefix["bytes_per_token"]
    # the report shows the inference section; the page-1 verdict rows name the strongest attack per part
    from reports.inference import verdict_rows
    from reports.report import build_report

    pdf = build_report(tmp_path)
    assert pdf.is_file() and pdf.stat().st_size > 0
    rows = verdict_rows(frame)
    server = {r["section"]: r for r in rows if r["threat"] == "curious_server"}
    assert set(server) == {"inference: prompt", "inference: response"}
    assert server["inference: response"]["level"] == "most"
    assert server["inference: response"]["advantage_lo"] <= server["inference: response"]["advantage"]
    assert server["inference: response"]["cheapest"] is None  # encryption does not stop the server
    assert set(rows[0]) == {"section", "threat", "level", "attack", "advantage", "advantage_lo", "advantage_hi",
                            "cheapest", "cheapest_cost"}


def test_defenses_act_at_inference(tmp_path):
    """DxP, DP on activations and SanText change what the client releases at every generation step (the
    answer moves away from the undefended one, measured by answer ROUGE-L); each runs with its defence-aware
    attacker; DP's release count covers the prompt and every generated token."""
    from suite.experiment.config import parse_config
    from suite.experiment.schedule import run_matrix
    from suite.experiment.store import load_results

    defenses = ["none", {"name": "dxp", "eta": 5.0}, {"name": "dp_gaussian", "sigma": 2.0, "clip": 1.0},
                {"name": "santext", "epsilon": 0.5}]
    cfg = parse_config({**INFER, "matrix": {**INFER["matrix"], "mode": ["inference"], "attacks": ["nearest_embedding"],
                                            "threats": ["curious_server"], "defenses": defenses, "splits": [0]}})
    run_matrix(cfg, tmp_path)
    frame = load_results(tmp_path)
    assert (frame["status"] == "ok").all(), frame[["defense", "error"]].to_string()
    cells = frame[frame["attack"] == "nearest_embedding"].set_index("defense")
    assert cells.loc["none", "answer_rougeL"] == 100.0
    for name in ("dxp", "dp_gaussian", "santext"):
        assert cells.loc[name, "answer_rougeL"] < 100.0, name  # the defense acted on what the client sent
        assert cells.loc[name, "prompt_token_accuracy"] < cells.loc["none", "prompt_token_accuracy"], name
    report = cells.loc["dp_gaussian", "defense_report"]
    # the prompt's release, then one per generated token but the last: new_tokens releases per generation
    assert report["inference"]["releases_per_generation"] == 6
    assert report["inference"]["epsilon_per_generation"] > 0


SEEDS_TOML = """
[model]
name = "tiny-llama"
[data]
max_length = 10
private = { generator = "records", size = 6, seed = 1 }
shadow = { generator = "records", size = 24, seed = 2 }
[training]
clients = 2
steps = 2
batch_size = 2
[inference]
new_tokens = 4
[matrix]
mode = ["inference"]
splits = [0]
threats = ["curious_server"]
attacks = ["nearest_embedding"]
defenses = ["none"]
seeds = [0, 1]
"""


def test_splitleak_run_of_an_inference_config_pools_seeds_and_reports(tmp_path):
    from reports.inference import section, split_modes
    from reports.tables import prepare
    from suite.cli import main
    from suite.experiment.store import load_results

    config = tmp_path / "inference.toml"
    config.write_text(SEEDS_TOML)
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.pdf").stat().st_size > 0
    pooled = load_results(tmp_path / "out")
    row = pooled[(pooled["attack"] == "nearest_embedding") & pooled["seed"].isna()].iloc[0]
    assert row["mode"] == "inference" and row["seeds"] == [0, 1]
    assert row["prompt_token_accuracy"] == 1.0  # k = 0: the head output is the embedding
    assert row["response_token_accuracy_lo"] is not None and row["adv_response_token_accuracy"] is not None
    training, inference = split_modes(prepare(pooled))
    assert training.empty and len(section(inference)) >= 2  # the report's inference section: title, table...


def test_generate_command_prints_the_answer_and_what_the_server_read(capsys):
    from suite.cli import main

    code = main(["generate", "Contact Ann at 555", "--model", "tiny-llama", "--steps", "1", "--max-length", "10",
                 "--private-size", "4", "--new-tokens", "4", "--attack", "nearest_embedding", "-k", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "answer:" in out and "bytes on the wire per token" in out
    assert "prompt:" in out and "(token acc 1.000)" in out  # k = 0: the server reads the prompt exactly


def test_verdict_rows_name_the_cheapest_defense_that_reaches_little():
    import pandas as pd

    from reports.inference import verdict_rows

    def row(defense, attack, adv, hi, quality):
        return {"mode": "inference", "status": "ok", "threat": "curious_server", "attack": attack,
                "defense": defense, "defense_params": {"eta": 10} if defense == "dxp" else {}, "head_blocks": 1,
                "adv_prompt_token_accuracy": adv, "adv_prompt_token_accuracy_lo": adv - 0.01,
                "adv_prompt_token_accuracy_hi": hi, "adv_response_token_accuracy": adv,
                "adv_response_token_accuracy_lo": adv - 0.01, "adv_response_token_accuracy_hi": hi,
                "answer_rougeL": quality}

    frame = pd.DataFrame([row("none", "prefix_inversion", 0.95, 0.97, 100.0),
                          row("dxp", "prefix_inversion", 0.01, 0.03, 60.0),
                          row("dxp", "nearest_embedding", 0.0, 0.01, 60.0),
                          row("encryption", "prefix_inversion", 0.95, 0.97, 100.0),
                          {**row("none", "blind", 0.0, 0.0, 100.0), "status": "ok"}])
    rows = {r["section"]: r for r in verdict_rows(frame)}
    assert rows["inference: prompt"]["level"] == "most"
    assert rows["inference: prompt"]["attack"] == "prefix_inversion"
    assert rows["inference: prompt"]["cheapest"] == "dxp (eta=10) at k=1"
    assert "60" in rows["inference: prompt"]["cheapest_cost"]
    assert verdict_rows(frame.assign(mode="training")) == []


def test_model_completion_trains_its_own_tail_on_public_text_and_reads_a_fine_tuned_answer():
    """The client fine-tuned its tail to a domain the public model does not know ("X works at Y." where the
    public model learnt "X lives in Y."); the server trains a tail of its own on public text of that domain
    (shadow text only, disjoint from the victims') and reads the answers from the hidden states it returned
    better than with the public tail."""
    import copy
    import random

    from attacks.model_completion import ModelCompletionAttack, ModelCompletionConfig
    from suite.engine.split import position_ids_for
    from suite.interfaces.threats import Observations, get_threat

    names, cities = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"], ["paris", "rome",
                                                                                        "oslo", "lima", "cairo"]
    rng = random.Random(0)

    def text(verb: str) -> str:
        return " ".join(f"{rng.choice(names)} {verb} {rng.choice(cities)}." for _ in range(4))

    public, private, shadow = ([text(v) for _ in range(64)] for v in ("lives in", "works at", "works at"))
    base = tiny_model("llama", num_layers=3)
    tok, spec = base.tokenizer, SplitSpec(1, 1)

    def fit(model, texts, params, steps):
        enc = tok(texts, padding="max_length", max_length=32, truncation=True, padding_side="right",
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        opt, gen = torch.optim.Adam(params, lr=3e-3), torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            rows = torch.randperm(len(texts), generator=gen)[:16]
            loss = model(input_ids=ids[rows], attention_mask=mask[rows],
                         labels=ids[rows].masked_fill(mask[rows] == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.requires_grad_(False).eval()

    fit(base.model, public, list(base.model.parameters()), 80)  # the public model
    client = copy.deepcopy(base.model)
    split = split_model(client, spec)
    tuned = [p.requires_grad_(True) for n, p in split.client_tail.named_parameters() if "lm_head" not in n]
    fit(client, private, tuned, 60)  # the client's tail (its block and final norm) fine-tuned
    outs, truth, plen = [], [], 6
    with torch.no_grad():
        for t in private[:8]:
            prompt = tok(t, return_tensors="pt")["input_ids"][:, :plen]
            full = client.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=12, min_new_tokens=12, pad_token_id=0)[0]
            seq = full[None, :-1]
            m = torch.ones_like(seq)
            outs.append(split.server_trunk(split.client_head(seq, m, position_ids_for(m)), m, position_ids_for(m))[0])
            truth.append(full[:-1])

    def response_accuracy(cfg):
        obs = Observations(threat=get_threat("curious_server"), spec=spec, tokenizer=tok, max_length=32,
                           base_model=lambda: copy.deepcopy(base.model), shadow=tuple(shadow),
                           trunk_outputs=tuple(outs), lengths=tuple(len(t) for t in truth))
        rec = ModelCompletionAttack(cfg).reconstruct(obs)
        acc = torch.stack([(rec.token_ids[i, plen:len(t)] == t[plen:]).float().mean() for i, t in enumerate(truth)])
        return float(acc.mean()), rec.extra

    public_acc, info = response_accuracy(ModelCompletionConfig(tail="public"))
    assert info == {"tail": "public"}
    trained_acc, info = response_accuracy(ModelCompletionConfig())  # the default: tail trained, LoRA
    assert info["tail"] == "trained" and info["steps"] == 60 and info["loss_last"] < info["loss_first"]
    assert trained_acc >= 0.6 and trained_acc >= public_acc + 0.2, (trained_acc, public_acc)
    with pytest.raises(ConfigError, match="tail = 'nope'"):
        ModelCompletionConfig(tail="nope")
    no_text = Observations(threat=get_threat("curious_server"), spec=spec, tokenizer=tok, max_length=32,
                           base_model=lambda: copy.deepcopy(base.model), trunk_outputs=tuple(outs))
    with pytest.raises(ConfigError, match="needs public shadow text"):
        ModelCompletionAttack(ModelCompletionConfig()).reconstruct(no_text)


def _verdict_frame(rows):
    import pandas as pd

    def row(defense, attack, adv, quality=60.0, k=1, **kw):
        return {"mode": "inference", "status": "ok", "error": None, "threat": "curious_server", "attack": attack,
                "defense": defense, "defense_params": {"eta": 10} if defense == "dxp" else {}, "head_blocks": k,
                "adv_prompt_token_accuracy": adv, "adv_prompt_token_accuracy_lo": max(0.0, adv - 0.01),
                "adv_prompt_token_accuracy_hi": adv + 0.02, "adv_response_token_accuracy": adv,
                "adv_response_token_accuracy_lo": max(0.0, adv - 0.01),
                "adv_response_token_accuracy_hi": adv + 0.02, "answer_rougeL": quality, **kw}

    return pd.DataFrame([row(*r[:3], **(r[3] if len(r) > 3 else {})) for r in rows])


def test_inference_cheapest_needs_the_strongest_attack_and_a_defense_that_acted():
    """Review finding 4: dxp checked only by the weak nearest_embedding is never sufficient; a defense whose
    leakage equals the undefended one did not act; a threat whose cells all failed has an "unknown" row."""
    from reports.inference import verdict_rows

    weak_only = _verdict_frame([("none", "prefix_inversion", 0.9), ("none", "nearest_embedding", 0.0),
                                ("dxp", "nearest_embedding", 0.0)])
    assert {r["cheapest"] for r in verdict_rows(weak_only)} == {None}
    checked = _verdict_frame([("none", "prefix_inversion", 0.9), ("dxp", "prefix_inversion", 0.01)])
    assert {r["cheapest"] for r in verdict_rows(checked)} == {"dxp (eta=10) at k=1"}
    idle = _verdict_frame([("none", "prefix_inversion", 0.9), ("none", "prefix_inversion", 0.01, {"head_blocks": 2}),
                           ("dxp", "prefix_inversion", 0.01, {"head_blocks": 2})])
    assert {r["cheapest"] for r in verdict_rows(idle)} == {None}
    failed = _verdict_frame([("none", "prefix_inversion", 0.9, {"status": "failed", "error": "oom"})])
    rows = verdict_rows(failed)
    assert [r["level"] for r in rows] == ["unknown", "unknown"] and "oom" in rows[0]["note"]
