"""`splitleak bench`: costs measured side by side in one run, printed as ratios and one JSON line.

1. Step time, split (plaintext, with the encryption defense, with the integrity audit) vs centralised: the same model, the same batch, the same LoRA adapters (rank, targets:
   every block's linear layers), the same optimiser. The centralised step is one forward/backward/step on
   the unsplit model; the split step is one client's two round trips through the byte-level transport
   (serialisation included). Measured interleaved (A, B, A, B, …) after a warm-up; medians are compared.
2. Memory of ``per_client`` with 1 vs 8 clients: the peak resident memory of a server process holding the
   trunk with one adapter set (and optimiser) per client and serving one step per client. Each count runs
   in its own fresh process, so peaks do not mask each other.
3. Leaving the process (``suite.net.bench``): a split step over loopback gRPC + mTLS vs in-process, and the
   Ray executor's overhead per cell.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from peft import inject_adapter_in_model

from suite.defense import make_defense
from suite.models import load_model
from suite.parties import Batch, causal_lm_loss
from suite.split import SplitSpec, family_of, split_model
from suite.training import FinetuneConfig, TrainConfig, build_server, build_session, lora_config
from suite.transport import InProcessTransport


def _batch(vocab: int, batch_size: int, length: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    return Batch(ids, mask, ids.clone())


def _centralised_step(model, optimizer, batch: Batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    causal_lm_loss(logits, batch.labels).backward()
    optimizer.step()


def _split_step(session, batch: Batch, step: int) -> None:
    client, server = session.clients[0], session.server
    client.send_activations(step, batch)
    server.forward([client.id], step)
    client.receive_hidden(step)
    server.backward(step)
    client.receive_gradient(step)


def step_times(model_name: str, batch_size: int, max_length: int, reps: int, spec: SplitSpec) -> dict:
    loaded = load_model(model_name)
    ft = FinetuneConfig()
    vocab = loaded.model.config.vocab_size
    batch = _batch(vocab, batch_size, max_length)

    central = copy.deepcopy(loaded.model)
    central.requires_grad_(False)
    fam = family_of(central)
    torch.manual_seed(0)
    names = fam.lora_attention if ft.targets == "attention" else fam.lora_targets
    inject_adapter_in_model(lora_config(ft, list(names), fam), central)
    central.train()
    opt = torch.optim.AdamW([p for p in central.parameters() if p.requires_grad], lr=ft.lr)

    data = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    train_cfg = TrainConfig(clients=1, batch_size=batch_size, finetune=ft)
    encrypted_model, audited_model = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    session = build_session(loaded.model, spec, [data], train_cfg)
    channel = make_defense("encryption").wrap_transport(InProcessTransport())
    encrypted = build_session(encrypted_model, spec, [data], train_cfg, transport=channel)
    audit = make_defense("integrity_audit")
    audited = build_session(audited_model, spec, [data], train_cfg)
    audit.install(audited)
    split_params = sum(p.numel() for m in (session.clients[0].head, session.clients[0].tail, session.server.trunk)
                       for p in m.parameters() if p.requires_grad)
    central_params = sum(p.numel() for p in central.parameters() if p.requires_grad)

    steps = {"split": lambda i: _split_step(session, batch, i),
             "encrypted": lambda i: _split_step(encrypted, batch, i),
             "audited": lambda i: _split_step(audited, batch, i)}
    times: dict[str, list[float]] = {"centralised": [], **{k: [] for k in steps}}
    for i in range(reps + 2):  # two warm-up rounds, then interleaved timings
        t = time.perf_counter()
        _centralised_step(central, opt, batch)
        runs = [("centralised", time.perf_counter() - t)]
        for name, step in steps.items():
            t = time.perf_counter()
            step(i)
            runs.append((name, time.perf_counter() - t))
        if i >= 2:
            for name, dt in runs:
                times[name].append(dt)
    c, s, e, a = (statistics.median(times[k]) for k in ("centralised", "split", "encrypted", "audited"))
    return {
        "model": model_name,
        "revision": loaded.revision,
        "batch_size": batch_size,
        "max_length": max_length,
        "head_blocks": spec.head_blocks,
        "tail_blocks": spec.tail_blocks,
        "trainable_params_central": central_params,
        "trainable_params_split": split_params,
        "centralised_s_per_step": c,
        "split_s_per_step": s,
        "split_over_centralised": s / c,
        "split_encrypted_s_per_step": e,
        "split_encrypted_over_centralised": e / c,
        "split_audited_s_per_step": a,
        "audited_over_split": a / s,
        "audit_extra_compute_units": audit.report()["extra_compute"],
        "bytes_per_split_step": session.transport.bytes_sent // (reps + 2),
    }


def _memprobe(model_name: str, clients: int, batch_size: int, max_length: int) -> dict[str, int]:
    """Run in a fresh process: a per_client server with ``clients`` adapter sets serves one step per client
    (client activations and gradients are synthetic: only the server's memory is measured). Returns the
    process's peak RSS (dominated by loading the model), its RSS after serving, and the bytes of the
    server's state (trunk weights, adapters, gradients, optimiser moments), all in bytes."""
    loaded = load_model(model_name, progress=lambda _: None)
    cfg = TrainConfig(strategy="per_client", clients=clients, batch_size=batch_size)
    loaded.model.requires_grad_(False)
    torch.manual_seed(0)
    server = build_server(split_model(loaded.model, SplitSpec(1, 1)), cfg, InProcessTransport())
    hidden_size = loaded.model.config.hidden_size
    mask = torch.ones(batch_size, max_length, dtype=torch.long)
    pos = torch.arange(max_length).expand(batch_size, max_length)
    for c in range(clients):
        server.activate_for(c)
        x = torch.randn(batch_size, max_length, hidden_size, requires_grad=True)
        out = server.trunk(x, mask, pos)
        out.backward(torch.randn_like(out))
        server.optimizers[server.adapters[c]].step()
    tensors = [p for p in server.trunk.parameters()] + [p.grad for p in server.trunk.parameters() if p.grad is not None]
    for opt in server.optimizers.values():
        tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    import psutil

    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # dominated by loading the model
        "rss_after_steps": psutil.Process().memory_info().rss,  # what the serving process holds
        "state_bytes": sum(storages.values()),
    }


def peak_memory(model_name: str, clients: int, batch_size: int, max_length: int) -> dict[str, int]:
    code = (
        "import json; from suite.bench import _memprobe; "
        f"print(json.dumps(_memprobe({model_name!r}, {clients}, {batch_size}, {max_length})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(*, model: str, batch_size: int, max_length: int, reps: int, head_blocks: int, tail_blocks: int,
              memory: bool = True, remote: bool = True) -> dict:
    spec = SplitSpec(head_blocks, tail_blocks)
    result = step_times(model, batch_size, max_length, reps, spec)
    print(f"step time  centralised {result['centralised_s_per_step']*1e3:8.1f} ms   "
          f"split {result['split_s_per_step']*1e3:8.1f} ms   "
          f"split/centralised = {result['split_over_centralised']:.3f}  (target <= 1.05)")
    print(f"           split + encryption {result['split_encrypted_s_per_step']*1e3:8.1f} ms   "
          f"encrypted/centralised = {result['split_encrypted_over_centralised']:.3f}  (target <= 1.05)")
    print(f"           split + integrity audit {result['split_audited_s_per_step']*1e3:8.1f} ms   "
          f"audited/split = {result['audited_over_split']:.3f}  (target <= 1.10; redundant recomputation = 2.0)")
    if memory:
        one = peak_memory(model, 1, batch_size, max_length)
        eight = peak_memory(model, 8, batch_size, max_length)
        for key in ("peak_rss", "rss_after_steps", "state_bytes"):
            result[f"per_client_{key}_1"], result[f"per_client_{key}_8"] = one[key], eight[key]
            result[f"per_client_{key}_8_over_1"] = eight[key] / one[key]
            print(f"per_client server {key:15s}  1 client {one[key]/2**20:8.1f} MiB   "
                  f"8 clients {eight[key]/2**20:8.1f} MiB   8/1 = {eight[key]/one[key]:.3f}  (target <= 1.2)")
    if remote:
        from suite.net.bench import grpc_step_times, ray_overhead

        g = grpc_step_times(model, batch_size, max_length, reps, head_blocks, tail_blocks)
        result.update(g)
        print(f"remote     in-process (AES-GCM) {g['in_process_encrypted_s_per_step']*1e3:8.1f} ms   gRPC + mTLS over "
              f"loopback {g['grpc_mtls_s_per_step']*1e3:8.1f} ms   grpc/in-process = {g['grpc_over_in_process']:.3f}  "
              "(target <= 1.3; FL-GLM: 2.7 across two machines)")
        r = ray_overhead()
        result.update(r)
        if "ray_overhead_s_per_cell" in r:
            print(f"ray        {r['ray_cells']} tiny cells in {r['ray_groups']} tasks: local {r['local_matrix_s']:.1f} s, "
                  f"ray {r['ray_matrix_s']:.1f} s (+ {r['ray_cluster_start_s']:.1f} s cluster start)   overhead "
                  f"{r['ray_overhead_s_per_cell']:.2f} s per cell, {r['ray_overhead_s_per_task']:.2f} s per task")
        else:
            print(f"ray        {r['ray']}")
    print(json.dumps(result, sort_keys=True))
    return result
