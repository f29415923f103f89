"""`splitleak bench`: costs measured side by side in one run, printed as ratios and one JSON line.

1. Step time, split (plaintext, with the encryption defense, with the integrity audit) vs centralised: the same model, the same batch, the same LoRA adapters (rank, targets:
   every block's linear layers), the same optimiser. The centralised step is one forward/backward/step on
   the unsplit model; the split step is one client's two round trips through the byte-level transport
   (serialisation included). Measured interleaved (A, B, A, B, …) after a warm-up; medians are compared.
2. Memory of ``per_client`` with 1 vs 8 clients: the peak resident memory of a server process holding the
   trunk with one adapter set (and optimiser) per client and serving one step per client. Each count runs
   in its own fresh process, so peaks do not mask each other.
3. Leaving the process (``suite.harness.net_bench``): a split step over loopback gRPC + mTLS vs in-process, and the
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

from suite.engine.device import peak_accelerator_memory, resolve_device, synchronize
from suite.engine.models import load_model
from suite.engine.parties import Batch, causal_lm_loss
from suite.engine.protocol import ActivationMsg, decode, encode
from suite.engine.split import SplitSpec, family_of, frozen_memo, split_model
from suite.engine.step import training_step
from suite.engine.training import (
    STRATEGIES,
    FinetuneConfig,
    TrainConfig,
    build_server,
    build_session,
    lora_config,
)
from suite.engine.transport import SERVER, InProcessTransport, client_endpoint
from suite.errors import ConfigError
from suite.harness.synthetic import random_batch
from suite.interfaces.defense import make_defense


def _centralised_step(model, optimizer, batch: Batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    causal_lm_loss(logits, batch.labels).backward()
    optimizer.step()


def _split_step(session, batch: Batch, step: int) -> None:
    training_step(session.clients[:1], session.server, step, [batch])


def load_bench_model(model_name: str, model_config: str | None = None, layers: int | None = None,
                     dtype: str = "float32", progress=None, device: str = "cpu"):
    """``--model`` (a real model) or ``--model-config`` (random weights in a bundled config's shapes)."""
    from suite.engine.device import resolve_dtype
    from suite.engine.models import random_model

    dt = resolve_dtype(dtype)
    if model_config:
        return random_model(model_config, layers=layers, dtype=dt, device=resolve_device(device))
    kwargs = {"progress": progress} if progress is not None else {}
    return load_model(model_name, dtype=dt, **kwargs)


def _shared_copy(model):
    """A copy with its own modules that shares every frozen weight (the bench's variants train adapters
    only): one copy of the base in memory, however many variants are timed side by side."""
    model.requires_grad_(False)
    return copy.deepcopy(model, frozen_memo(model))


def _timed(device, fn) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def step_times(model_name: str, batch_size: int, max_length: int, reps: int, spec: SplitSpec, *,
               loaded=None, device: str = "auto") -> dict:
    loaded = loaded if loaded is not None else load_model(model_name)
    dev = resolve_device(device)
    loaded.model.requires_grad_(False)
    loaded.model.to(dev)
    ft = FinetuneConfig()
    vocab = loaded.model.config.vocab_size
    batch = random_batch(vocab, batch_size, max_length)
    central_batch = batch.to(dev)

    central = _shared_copy(loaded.model)
    central.requires_grad_(False)
    fam = family_of(central)
    torch.manual_seed(0)
    names = fam.lora_attention if ft.targets == "attention" else fam.lora_targets
    inject_adapter_in_model(lora_config(ft, list(names), fam), central)
    central.train()
    opt = torch.optim.AdamW([p for p in central.parameters() if p.requires_grad], lr=ft.lr)

    data = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    train_cfg = TrainConfig(clients=1, batch_size=batch_size, finetune=ft)
    encrypted_model, audited_model = _shared_copy(loaded.model), _shared_copy(loaded.model)
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
        runs = [("centralised", _timed(dev, lambda: _centralised_step(central, opt, central_batch)))]
        for name, step in steps.items():
            runs.append((name, _timed(dev, lambda step=step, i=i: step(i))))
        if i >= 2:
            for name, dt in runs:
                times[name].append(dt)
    c, s, e, a = (statistics.median(times[k]) for k in ("centralised", "split", "encrypted", "audited"))
    return {
        "model": loaded.name,
        "device": str(dev),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
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


def _memprobe(model_name: str, clients: int, batch_size: int, max_length: int, model_config: str | None = None,
              layers: int | None = None, dtype: str = "float32", device: str = "cpu") -> dict[str, int]:
    """Run in a fresh process: a per_client server with ``clients`` adapter sets serves one step per client
    (client activations and gradients are synthetic: only the server's memory is measured). Returns the
    process's peak RSS (dominated by loading the model), its RSS after serving, and the bytes of the
    server's state (trunk weights, adapters, gradients, optimiser moments), all in bytes."""
    dev = resolve_device(device)
    loaded = load_bench_model(model_name, model_config, layers, dtype, progress=lambda _: None, device=str(dev))
    cfg = TrainConfig(strategy="per_client", clients=clients, batch_size=batch_size)
    loaded.model.requires_grad_(False)
    torch.manual_seed(0)
    server = build_server(split_model(loaded.model, SplitSpec(1, 1)), cfg, InProcessTransport(), device=dev)
    hidden_size = loaded.model.config.hidden_size
    mask = torch.ones(batch_size, max_length, dtype=torch.long, device=dev)
    pos = torch.arange(max_length, device=dev).expand(batch_size, max_length)
    for c in range(clients):
        server.activate_for(c)
        x = torch.randn(batch_size, max_length, hidden_size, device=dev, dtype=loaded.model.dtype,
                        requires_grad=True)
        out = server.trunk(x, mask, pos)
        out.backward(torch.randn_like(out))
        server.optimizers[server.adapters[c]].step()
    tensors = [p for p in server.trunk.parameters()] + [p.grad for p in server.trunk.parameters() if p.grad is not None]
    for opt in server.optimizers.values():
        tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    import psutil

    out = {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # dominated by loading the model
        "rss_after_steps": psutil.Process().memory_info().rss,  # what the serving process holds
        "state_bytes": sum(storages.values()),
    }
    peak = peak_accelerator_memory(dev)
    if peak is not None:
        out["gpu_peak_allocated"] = peak
    return out


def peak_memory(model_name: str, clients: int, batch_size: int, max_length: int, model_config: str | None = None,
                layers: int | None = None, dtype: str = "float32", device: str = "cpu") -> dict[str, int]:
    code = (
        "import json; from suite.harness.bench import _memprobe; "
        f"print(json.dumps(_memprobe({model_name!r}, {clients}, {batch_size}, {max_length}, {model_config!r}, "
        f"{layers!r}, {dtype!r}, {device!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def strategy_throughput(loaded, batch_size: int, max_length: int, reps: int, spec: SplitSpec,
                        client_counts=(1, 2, 4, 8), device: str = "auto") -> dict:
    """Tokens per second of one training step of ``serial``, ``batch_parallel`` and ``per_client`` with N
    clients (each sends ``batch_size`` x ``max_length`` tokens per step), the three sessions timed
    interleaved (A, B, C, A, B, C, ...) after one warm-up step each; medians are compared. All sessions share
    the frozen base weights (LoRA only), so memory grows with adapters, not with N copies of the model."""
    dev = resolve_device(device)
    loaded.model.requires_grad_(False)
    loaded.model.to(dev)
    vocab = loaded.model.config.vocab_size
    out: dict = {}
    for n in client_counts:
        shards = []
        for c in range(n):
            b = random_batch(vocab, batch_size, max_length)
            g = torch.Generator().manual_seed(c + 1)
            ids = torch.randint(0, vocab, b.input_ids.shape, generator=g)
            shards.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        sessions = {}
        for strategy in STRATEGIES:
            cfg = TrainConfig(strategy=strategy, clients=n, batch_size=batch_size, finetune=FinetuneConfig())
            sessions[strategy] = build_session(_shared_copy(loaded.model), spec, shards, cfg)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(reps + 1):
            for strategy, sess in sessions.items():
                dt = _timed(dev, lambda sess=sess, fn=STRATEGIES[strategy], i=i: fn(sess.clients, sess.server, i))
                if i >= 1:
                    times[strategy].append(dt)
        tokens = n * batch_size * max_length
        for strategy, ts in times.items():
            out[f"tokens_per_s_{strategy}_{n}"] = tokens / statistics.median(ts)
        out[f"batch_parallel_over_serial_{n}"] = out[f"tokens_per_s_batch_parallel_{n}"] / out[f"tokens_per_s_serial_{n}"]
        out[f"per_client_over_serial_{n}"] = out[f"tokens_per_s_per_client_{n}"] / out[f"tokens_per_s_serial_{n}"]
        del sessions
    return out


def encryption_costs(loaded, batch_size: int, max_length: int, reps: int, device: str = "auto") -> dict:
    """One head->trunk message of hidden states living on the device: encode (copy to host + safetensors),
    plain transport + decode onto the device, vs the encryption defense's channel (AES-256-GCM) + decode.
    Interleaved, medians. What an accelerator adds is the copy to host, measured on its own."""
    dev = resolve_device(device)
    hidden_size = loaded.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, max_length, hidden_size, generator=g).to(dev, loaded.model.dtype)
    mask = torch.ones(batch_size, max_length, dtype=torch.long, device=dev)
    msg = ActivationMsg(0, 0, "to_server", x, mask, mask.cumsum(1) - 1)
    plain = InProcessTransport()
    channel = make_defense("encryption").wrap_transport(InProcessTransport())
    src = client_endpoint(0)

    def over(transport) -> None:
        transport.send(src, SERVER, encode(msg))
        decode(transport.recv(SERVER, src), device=dev)

    times: dict[str, list[float]] = {"copy_to_host": [], "plain": [], "encrypted": []}
    for i in range(reps + 2):
        runs = {"copy_to_host": _timed(dev, lambda: x.to("cpu")), "plain": _timed(dev, lambda: over(plain)),
                "encrypted": _timed(dev, lambda: over(channel))}
        if i >= 2:
            for k, v in runs.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = x.numel() * x.element_size()
    return {
        "message_bytes": nbytes,
        "copy_to_host_s": med["copy_to_host"],
        "message_plain_s": med["plain"],
        "message_encrypted_s": med["encrypted"],
        "encrypted_over_plain_message": med["encrypted"] / med["plain"],
        "aead_s": med["encrypted"] - med["plain"],
    }


def run_bench(*, model: str, batch_size: int, max_length: int, reps: int, head_blocks: int, tail_blocks: int,
              memory: bool = True, remote: bool = True, device: str = "auto", dtype: str = "float32",
              model_config: str | None = None, layers: int | None = None, strategies: bool = True,
              strategy_clients: tuple[int, ...] = (1, 2, 4, 8), step_times: bool = True) -> dict:
    """Every measurement of ``splitleak bench`` on one model (``model``, or random weights in a bundled
    config's shapes with ``model_config``) on one device and dtype; prints each table and one JSON line."""
    do_steps = step_times
    dev = resolve_device(device)  # refuse an absent device before building anything
    spec = SplitSpec(head_blocks, tail_blocks)
    if layers is not None and layers <= head_blocks + tail_blocks:
        raise ConfigError(f"--layers {layers} leaves the server no block with -k {head_blocks} -m {tail_blocks}; "
                          f"use --layers {head_blocks + tail_blocks + 1} or more")
    t0 = time.perf_counter()
    loaded = load_bench_model(model, model_config, layers, dtype, device=str(dev))
    n_params = sum(p.numel() for p in loaded.model.parameters())
    result: dict = {"model": loaded.name, "device": str(dev), "dtype": dtype, "parameters": n_params,
                    "build_s": time.perf_counter() - t0}
    print(f"model      {loaded.name}: {n_params / 1e6:.0f} M parameters, {dtype} on {dev} "
          f"(built in {result['build_s']:.1f} s){'  [random weights, bundled config]' if model_config else ''}")
    if do_steps:
        result.update(_step_times(model, batch_size, max_length, reps, spec, loaded=loaded, device=str(dev)))
        _print_steps(result)
    enc = encryption_costs(loaded, batch_size, max_length, reps, device=str(dev))
    result.update(enc)
    print(f"encryption one {enc['message_bytes'] / 2**20:.2f} MiB message of device tensors: copy to host "
          f"{enc['copy_to_host_s']*1e3:.2f} ms, plain encode+decode {enc['message_plain_s']*1e3:.2f} ms, "
          f"AES-GCM channel {enc['message_encrypted_s']*1e3:.2f} ms   encrypted/plain = "
          f"{enc['encrypted_over_plain_message']:.2f}")
    if strategies:
        thr = strategy_throughput(loaded, batch_size, max_length, reps, spec, strategy_clients, device=str(dev))
        result.update(thr)
        print("strategies tokens/s      " + "".join(f"{n:>10d} cl" for n in strategy_clients))
        for strategy in STRATEGIES:
            print(f"           {strategy:15s}" + "".join(f"{thr[f'tokens_per_s_{strategy}_{n}']:13.0f}"
                                                      for n in strategy_clients))
        print("           batch_parallel/serial" + "".join(f"{thr[f'batch_parallel_over_serial_{n}']:11.2f}  "
                                                          for n in strategy_clients)
              + " (goal at 4 clients: >= 2 on a GPU, >= 1 on the CPU)")
    del loaded
    if memory:
        one = peak_memory(model, 1, batch_size, max_length, model_config, layers, dtype, str(dev))
        eight = peak_memory(model, 8, batch_size, max_length, model_config, layers, dtype, str(dev))
        for key in [k for k in one if k in eight]:
            result[f"per_client_{key}_1"], result[f"per_client_{key}_8"] = one[key], eight[key]
            result[f"per_client_{key}_8_over_1"] = eight[key] / one[key]
            print(f"per_client server {key:18s}  1 client {one[key]/2**20:8.1f} MiB   "
                  f"8 clients {eight[key]/2**20:8.1f} MiB   8/1 = {eight[key]/one[key]:.3f}  (target <= 1.2)")
    if remote and model_config:
        print("remote     skipped: gRPC and Ray are measured on --model, not on random --model-config weights")
    elif remote:
        _remote(result, model, batch_size, max_length, reps, head_blocks, tail_blocks)
    print(json.dumps(result, sort_keys=True))
    return result


_step_times = step_times


def _print_steps(result: dict) -> None:
    print(f"step time  centralised {result['centralised_s_per_step']*1e3:8.1f} ms   "
          f"split {result['split_s_per_step']*1e3:8.1f} ms   "
          f"split/centralised = {result['split_over_centralised']:.3f}  (target <= 1.05)")
    print(f"           split + encryption {result['split_encrypted_s_per_step']*1e3:8.1f} ms   "
          f"encrypted/centralised = {result['split_encrypted_over_centralised']:.3f}  (target <= 1.05)")
    print(f"           split + integrity audit {result['split_audited_s_per_step']*1e3:8.1f} ms   "
          f"audited/split = {result['audited_over_split']:.3f}  (target <= 1.10; redundant recomputation = 2.0)")


def _remote(result: dict, model: str, batch_size: int, max_length: int, reps: int, head_blocks: int,
            tail_blocks: int) -> None:
    from suite.harness.net_bench import grpc_step_times, ray_overhead

    if True:  # keeps the block as it was (a merge-friendly move out of run_bench)
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
