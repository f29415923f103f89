"""`splitleak` command line. Errors in the user's input print one line (``splitleak: error: …``), exit 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from suite import __version__
from suite.errors import SplitleakError

EPILOG = "Metrics: BLEU/ROUGE on a 0-100 scale, rates (token accuracy, exact match, PII recovery) on 0-1."


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by commands that build a split-training run; each overrides the config file."""
    p.add_argument("--config", metavar="FILE", help="TOML experiment config (docs/config.md); flags override it")
    p.add_argument("--model", help="'smollm2-135m' (default, embedded), a hub id, a local directory or a .gguf file")
    p.add_argument("-k", "--head-blocks", type=int, help="decoder blocks on the client head (0 = embedding only)")
    p.add_argument("-m", "--tail-blocks", type=int, help="decoder blocks on the client tail (before norm + LM head)")
    p.add_argument("--strategy", choices=["serial", "batch_parallel", "per_client"], help="training strategy")
    p.add_argument("--clients", type=int, help="number of clients (each gets a disjoint shard)")
    p.add_argument("--steps", type=int, help="training steps (each step: every client once)")
    p.add_argument("--batch-size", type=int, help="sequences per client per step")
    p.add_argument("--lr", type=float, help="learning rate (AdamW) of every party trained with LoRA (and in full "
                   "unless --full-lr or [training] full_lr is set)")
    p.add_argument("--full-lr", type=float, help="learning rate of a part trained in full (default: --lr)")
    p.add_argument("--finetune", choices=["lora", "full", "frozen"], help="what the clients train (default lora)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (right-padded/truncated)")
    p.add_argument("--private-size", type=int, help="generated private records (when the config generates them)")
    p.add_argument("--seed", type=int, help="seed for adapters and batch order")
    _add_device_options(p)


def _add_device_options(p: argparse.ArgumentParser, server: bool = True) -> None:
    p.add_argument("--device", help="where to compute: auto (a GPU if one is visible, else the CPU), cpu, cuda, "
                   "cuda:N or mps")
    if server:
        p.add_argument("--server-device", help="where the server's trunk computes (default: --device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights' floating-point type")


def _config_from_args(args: argparse.Namespace):
    from suite.experiment.config import load_config, parse_config

    cfg = load_config(args.config)
    data = cfg.model_dump()
    overrides = {
        ("model", "name"): args.model,
        ("training", "head_blocks"): args.head_blocks,
        ("training", "tail_blocks"): args.tail_blocks,
        ("training", "strategy"): args.strategy,
        ("training", "clients"): args.clients,
        ("training", "steps"): args.steps,
        ("training", "batch_size"): args.batch_size,
        ("training", "lr"): args.lr,
        ("training", "full_lr"): args.full_lr,
        ("training", "finetune"): args.finetune,
        ("training", "seed"): args.seed,
        ("data", "max_length"): args.max_length,
        ("model", "device"): getattr(args, "device", None),
        ("model", "server_device"): getattr(args, "server_device", None),
        ("model", "dtype"): getattr(args, "dtype", None),
        ("training", "stages"): getattr(args, "stages", None),
    }
    for (section, key), value in overrides.items():
        if value is not None:
            data[section][key] = value
    if args.private_size is not None:
        if data["data"]["private"].get("generator") is None:
            raise SplitleakError("--private-size applies to generated private data; the config reads a file")
        data["data"]["private"]["size"] = args.private_size
    data["data"]["private"] = {k: v for k, v in data["data"]["private"].items() if v is not None}
    data["data"]["shadow"] = {k: v for k, v in data["data"]["shadow"].items() if v is not None}
    return parse_config(data, "command line")


def _preflight_single(cfg, threat: str | None = None) -> None:
    """Data, model, split (and threat) checked before anything loads: one line and exit 2 on a problem."""
    from suite.experiment.preflight import check_single

    check_single(cfg, threat)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from suite.engine.split import SplitSpec
    from suite.engine.training import eval_loss, train
    from suite.experiment.prepared import prepare

    cfg = _config_from_args(args)
    _preflight_single(cfg)
    t = cfg.training
    spec = SplitSpec(t.head_blocks, t.tail_blocks)
    prepared = prepare(cfg, spec)
    session = prepared.session
    print(
        f"splitleak: {cfg.model.name} ({prepared.loaded.revision}) split k={spec.head_blocks} m={spec.tail_blocks}, "
        f"{t.strategy}, {t.clients} clients x {sum(len(s) for s in prepared.private) // t.clients} records, "
        f"{t.steps} steps, client finetune={t.finetune}",
        file=sys.stderr,
    )
    before = eval_loss(session, prepared.eval_data)
    bar = tqdm(total=t.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def show(log) -> None:
        bar.set_postfix(loss=f"{log.loss:.3f}", s_per_step=f"{log.seconds:.2f}")
        bar.update(1)

    logs = train(session, on_step=show)
    bar.close()
    after = eval_loss(session, prepared.eval_data)
    if logs:
        n = max(1, min(5, len(logs) // 3))
        first = sum(log.loss for log in logs[:n]) / n
        last = sum(log.loss for log in logs[-n:]) / n
        print(f"train loss (mean of first/last {n} steps): {first:.3f} -> {last:.3f}")
    print(f"held-out loss: {before:.3f} -> {after:.3f}")
    print(f"bytes on the wire: {getattr(session.transport, 'bytes_sent', 0):,}")
    return 0


def _params(pairs: Sequence[str]) -> dict:
    """``key=value`` pairs; values parse as TOML scalars (numbers, booleans, quoted strings) or stay strings."""
    import tomllib

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SplitleakError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            params[key] = value
    return params


def cmd_attack(args: argparse.Namespace) -> int:
    from suite.engine.split import SplitSpec
    from suite.experiment.cell import run_cell
    from suite.interfaces.attack import ATTACKS

    cfg = _config_from_args(args)
    if args.capture:
        if ATTACKS.get(args.attack).kind == "memorisation":
            raise SplitleakError(f"{args.attack} reads a trained model, not traffic: drop --capture (it trains the "
                                 "split with the config's canaries)")
        return _attack_capture(cfg, args)
    _preflight_single(cfg, args.threat)  # before the attacks (and torch) load
    spec = SplitSpec(cfg.training.head_blocks, cfg.training.tail_blocks)
    if ATTACKS.get(args.attack).kind == "memorisation":
        return _attack_memorisation(cfg, spec, args)
    result = run_cell(cfg, spec, args.threat, args.attack, _params(args.param),
                      defense_name=args.defense, defense_params=_params(args.defense_param))
    m = result.metrics
    print(f"cell: model={cfg.model.name} k={spec.head_blocks} m={spec.tail_blocks} threat={args.threat} "
          f"attack={args.attack} defense={args.defense} {result.defense_report or ''}")
    if result.reconstruction.note:
        print(f"note: {result.reconstruction.note}")
    pii = "n/a" if m.pii_recovery is None else f"{m.pii_recovery:.3f}"
    print(f"BLEU-4 {m.bleu4:6.2f}  ROUGE-1 {m.rouge1:6.2f}  ROUGE-2 {m.rouge2:6.2f}  ROUGE-L {m.rougeL:6.2f}  "
          f"token acc {m.token_accuracy:.3f}  exact {m.exact_match:.3f}  PII {pii}")
    print(f"utility (held-out loss) {result.utility:.3f}   attack cost {result.cost.seconds:.1f} s, "
          f"peak RSS {result.cost.peak_rss_mib:.0f} MiB")
    if result.utility_centralised is not None:
        print(f"held-out perplexity {result.perplexity:.2f} under the defense; centralised LoRA reference: loss "
              f"{result.utility_centralised:.3f}, perplexity {result.perplexity_centralised:.2f}")
    for ref, hyp in list(zip(result.references, result.reconstruction.texts, strict=False))[: args.samples]:
        print(f"  original: {ref}\n  attacker: {hyp}")
    return 0


def _attack_memorisation(cfg, spec, args: argparse.Namespace) -> int:
    """``attack`` with canary_exposure, membership or extraction: train, read the threat's model view, score."""
    from suite.experiment.memorisation import run_memorisation_cell

    f = run_memorisation_cell(cfg, spec, args.threat, args.attack, _params(args.param),
                              defense_name=args.defense, defense_params=_params(args.defense_param))
    m = f["memorisation"]

    def iv(name: str, fmt: str) -> str:
        lo, hi = f.get(f"{name}_lo"), f.get(f"{name}_hi")
        return format(f[name], fmt) + ("" if lo is None else f" [{format(lo, fmt)}, {format(hi, fmt)}]")

    print(f"cell: model={cfg.model.name} k={spec.head_blocks} m={spec.tail_blocks} threat={args.threat} "
          f"attack={args.attack} defense={args.defense} {f['defense_report'] or ''}")
    views = m.get("views") or {}
    read = "; every granted view read: " + ", ".join(f"{v} {x:.3g}" for v, x in views.items()) if len(views) > 1 else ""
    print(f"view: {m.get('view')}{read}; canary victim: client {m['canary_victim']}")
    by = m.get("by_repeats") or {}
    if f.get("exposure") is not None:
        rep = ", ".join(f"{k}x: {v['exposure']:.1f}" for k, v in by.items())
        print(f"exposure {iv('exposure', '.2f')} bits of {m['space_bits']:.1f} (mean over {len(m['exposure'])} "
              f"canaries, {m['candidates']:,} candidates); by repeats {rep}")
    if f.get("auc") is not None:
        fp = m["false_positives"]
        print(f"membership ({m['signal']}, {m['members']} members, {m['non_members']} non-members): "
              f"AUC {iv('auc', '.3f')}  TPR@1% FPR {iv('tpr_at_1pct_fpr', '.3f')} ({fp['fp_at_1pct_fpr']} false "
              f"positives)  TPR@0.1% FPR {iv('tpr_at_0_1pct_fpr', '.3f')} ({fp['fp_at_0_1pct_fpr']} false positives)")
    if f.get("extracted") is not None:
        rep = ", ".join(f"{k}x: {v['extracted']:.2f}" for k, v in by.items())
        print(f"extracted verbatim {iv('extracted', '.2f')} of the canaries; by repeats {rep}; "
              f"by decoding {m['by_decoding']}")
    print(f"utility (held-out loss) {f['utility']:.3f}   attack cost {f['attack_seconds']:.1f} s, "
          f"peak RSS {f['attack_peak_rss_mib']:.0f} MiB")
    return 0


def _attack_capture(cfg, args: argparse.Namespace) -> int:
    """``attack --capture FILE``: the attack on a capture file's traffic (``suite.experiment.capture_attack``)."""
    from suite.experiment.capture_attack import attack_capture

    if args.defense != "none" or args.defense_param:
        raise SplitleakError("--capture takes the defense from the capture file's header; leave out --defense")
    result = attack_capture(cfg, args.capture, args.threat, args.attack, _params(args.param))
    print(f"capture {args.capture}: {result.batches} batches, defense={result.defense} (from its header), "
          f"threat={args.threat} attack={args.attack}")
    if result.reconstruction.note:
        print(f"note: {result.reconstruction.note}")
    if result.metrics is None:
        print("the capture holds no truth records: reconstruction unscored")
        for hyp in list(result.reconstruction.texts)[: args.samples]:
            print(f"  attacker: {hyp}")
        return 0
    m, iv = result.metrics, result.intervals
    print(f"BLEU-4 {m.bleu4:6.2f}  ROUGE-1 {m.rouge1:6.2f}  ROUGE-L {m.rougeL:6.2f}  token acc {m.token_accuracy:.3f} "
          f"[{iv['token_accuracy_lo']:.3f}, {iv['token_accuracy_hi']:.3f}]  exact {m.exact_match:.3f}   "
          f"attack cost {result.cost.seconds:.1f} s")
    for ref, hyp in list(zip(result.references, result.reconstruction.texts, strict=False))[: args.samples]:
        print(f"  original: {ref}\n  attacker: {hyp}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from suite.engine.split import SplitSpec
    from suite.experiment.generate_one import generate_one

    cfg = _config_from_args(args)
    inference = {"new_tokens": args.new_tokens, "temperature": args.temperature, "top_k": args.top_k}
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={k: v for k, v in inference.items() if v is not None})})
    from suite.experiment.config import parse_config

    cfg = parse_config(cfg.model_dump(), "command line")  # the overrides validated like the file
    _preflight_single(cfg, args.threat)
    spec = SplitSpec(cfg.training.head_blocks, cfg.training.tail_blocks)
    out = generate_one(cfg, spec, args.prompt, args.threat, args.attack, _params(args.param), args.defense,
                       _params(args.defense_param))
    print(f"answer: {out.answer}")
    print(f"{out.seconds_per_token * 1000:.1f} ms and {out.bytes_per_token:,.0f} bytes on the wire per token")
    if out.result is not None:
        r = out.result
        print(f"{args.threat}/{args.attack} read:")
        print(f"  prompt:   {r.hypotheses['prompt'][0]}   (token acc {r.metrics['prompt'].token_accuracy:.3f})")
        print(f"  response: {r.hypotheses['response'][0]}   (token acc {r.metrics['response'].token_accuracy:.3f})")
        if r.reconstruction.note:
            print(f"  note: {r.reconstruction.note}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from suite.experiment.config import DEFAULT_MATRIX, load_config
    from suite.experiment.preflight import check_matrix_run

    cfg = load_config(args.config if args.config else DEFAULT_MATRIX)
    cfg = _with_devices(cfg, args, check=False)
    workers = args.workers if args.workers is not None else cfg.executor.workers
    if workers < 1:
        raise SplitleakError(f"--workers must be at least 1, not {workers}")
    cells, skipped = check_matrix_run(cfg, args.out)  # everything checkable, before a store or a model exists
    _with_devices(cfg, args)  # the device exists here (imports torch: only once the input is known good)
    from tqdm import tqdm

    from suite.experiment.schedule import run_matrix  # imports torch: only once the input is known good
    left_out: dict[tuple[str, str, str], int] = {}  # one line per threat/attack pair, not per cell
    for cell, reason in skipped:
        pair = (cell.threat, cell.attack, reason)
        left_out[pair] = left_out.get(pair, 0) + 1
    for (threat, attack, reason), n in left_out.items():
        print(f"left out {n} cell{'s' if n != 1 else ''} {threat}/{attack}: {reason}", file=sys.stderr)
    bar = tqdm(total=len(cells), desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int, current: str) -> None:
        bar.n = done
        bar.set_postfix_str(current)
        bar.refresh()

    def note(line: str) -> None:
        bar.write(f"splitleak: {line}", file=sys.stderr)

    summary = run_matrix(cfg, args.out, workers=workers, executor=args.executor, address=args.address,
                         on_progress=progress, retry_failed=args.retry_failed, keep_stale=args.keep_stale,
                         on_note=note)
    bar.close()
    print(f"{summary['cells']} cells ({summary['ran']} run now, {summary['cells'] - summary['ran']} already done, "
          f"{len(summary['skipped'])} left out) in {summary['groups']} training runs -> {args.out}/results.sqlite")
    if not args.no_report:
        from reports.report import build_report

        print(f"report -> {build_report(args.out)}")
    if summary["failed"]:
        print(f"splitleak: {summary['failed']} of {summary['cells']} cells failed; see `splitleak results "
              f"{args.out}` (`splitleak run --retry-failed` reruns them)", file=sys.stderr)
        return 1
    return 0


def _with_devices(cfg, args: argparse.Namespace, check: bool = True):
    """``--device``/``--server-device``/``--dtype`` over a loaded config; the device must exist here
    (``check=False``: the caller checks it later, after the checks that need no torch)."""
    from suite.experiment.config import parse_config

    data = cfg.model_dump()
    for key in ("device", "server_device", "dtype"):
        if getattr(args, key, None) is not None:
            data["model"][key] = getattr(args, key)
    for part in ("private", "shadow"):
        data["data"][part] = {k: v for k, v in data["data"][part].items() if v is not None}
    cfg = parse_config(data, "command line")
    if check:
        from suite.experiment.prepared import devices

        devices(cfg)
    return cfg


LISTABLE = ("attacks", "defenses", "threats", "models")


def registered(kind: str) -> dict[str, str]:
    """Every name of one ``kind`` (``LISTABLE``) that configs and flags accept, with its one-line summary."""
    if kind == "attacks":
        from suite.interfaces.attack import ATTACKS

        return ATTACKS.summaries()
    if kind == "defenses":
        from suite.interfaces.defense import DEFENSES

        return DEFENSES.summaries()
    if kind == "threats":
        from suite.interfaces.presets import THREATS
        from suite.registry import one_line

        return {name + (":" + ",".join("ijk"[:t.stage_params]) if t.stage_params else ""): one_line(t.description)
                for name, t in THREATS.items()}
    from suite.engine.models import bundled_configs, named_models

    return named_models() | {name: f"random weights in {name}'s shapes, for `splitleak bench --model-config`"
                             for name in bundled_configs()}


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(LISTABLE)
    for i, kind in enumerate(kinds):
        entries = registered(kind)
        width = max(map(len, entries))
        print(("\n" if i else "") + f"{kind}:")
        for name, summary in entries.items():
            print(f"  {name:<{width}}  {summary}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from reports.summary import summary_table
    from suite.experiment.store import open_store

    with open_store(args.dir, must_exist=True) as store:
        print(summary_table(store.rows()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reports.report import build_report

    print(f"report -> {build_report(args.dir)}")  # no results store in DIR: a one-line error naming it
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    import json

    from reports.gate import make_baseline

    print(json.dumps(make_baseline(args.dir), indent=1, sort_keys=True))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reports.gate import check, junit, load_baseline, markdown, never_trip

    baseline = load_baseline(args.baseline)
    bad = never_trip(baseline)
    for line in bad:
        print(f"NEVER TRIPS {line}")
    if bad:
        raise SplitleakError(f"baseline {args.baseline} has {len(bad)} bands that can never trip (listed above); "
                             f"regenerate it with 'splitleak baseline DIR > {args.baseline}'")
    result = check(args.dir, baseline)
    if args.junit:
        try:
            Path(args.junit).write_bytes(junit(result))
        except OSError as err:
            raise SplitleakError(f"cannot write --junit {args.junit}: {err.strerror or err}") from None
    if args.markdown:
        print(markdown(result), end="")
    else:
        for line in result.problems:
            print(f"REGRESSION {line}")
        print(result.summary())
    return 1 if result.problems else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.fuzz is not None:
        from suite.harness.fuzz import run_fuzz

        result = run_fuzz(args.fuzz, seed=args.fuzz_seed)
        print(result.summary())
        return 0 if result.reached == 0 and result.controls_accepted == result.controls else 1
    from suite.harness.bench import run_bench

    run_bench(model=args.model, batch_size=args.batch_size, max_length=args.max_length, reps=args.reps,
              head_blocks=args.head_blocks, tail_blocks=args.tail_blocks, memory=not args.no_memory,
              remote=not args.no_remote, device=args.device or "auto", dtype=args.dtype or "float32",
              model_config=args.model_config, layers=args.layers,
              strategies=not args.no_strategies, strategy_clients=tuple(args.strategy_clients),
              step_times=not args.no_step_times)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from suite.net.certs import make_certs

    out = make_certs(args.dir, args.clients, hosts=tuple(args.host), stages=args.stages)
    print(f"throwaway CA, server and {args.clients} client certificates -> {out} (for trying things out only):\n"
          f"  {out / 'ca'}: the CA and its key; keep it, hand it to nobody\n"
          f"  {out / 'server'}: to the server only (`splitleak serve --certs {out / 'server'}`)\n"
          f"  {out / 'client-<i>'}: to client i only (`splitleak client --certs {out / 'client-<i>'} --id <i>`)")
    if args.stages:
        print(f"  {out / 'stage-<i>'}: to pipeline stage i only (`splitleak serve --stage <i> --certs "
              f"{out / 'stage-<i>'}`), {args.stages} of them")
    return 0


def _net_defense(cfg, args: argparse.Namespace):
    """``--defense`` / ``--defense-param`` of serve and client (else the config's single defense)."""
    from suite.net.defended import choose_defense

    if args.defense is None and args.defense_param:
        raise SplitleakError("--defense-param needs --defense NAME")
    return choose_defense(cfg, args.defense, _params(args.defense_param))


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop a serving process cleanly (its server stopped, its checkpoint kept),
    also where it was started with SIGINT ignored: a background job of a non-interactive shell (`serve &` in a
    script, CI) inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler of its own."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def cmd_serve(args: argparse.Namespace) -> int:
    from suite.net.parties import serve

    _stop_on_signals()
    if args.device is not None and args.server_device is None:
        args.server_device = args.device  # `serve --device` is the server's own device
    cfg = _config_from_args(args)
    _preflight_single(cfg)
    t = cfg.training

    def ready(port: int, events: list[str]) -> None:
        for event in events:
            print(f"splitleak serve: {event}", file=sys.stderr)
        where = f"stage {args.stage} of {t.stages}, " if args.stage is not None else ""
        print(f"splitleak serve: {where}{cfg.model.name} k={t.head_blocks} m={t.tail_blocks} {t.strategy}, "
              f"{t.clients} clients, gRPC + mutual TLS on port {port}; Ctrl-C stops", file=sys.stderr, flush=True)

    if args.stage is not None:  # one pipeline stage (suite.net.stages)
        from suite.net.stages import serve_stage

        if args.capture:
            raise SplitleakError("--capture is not supported with --stage")
        timeouts = {"turn_timeout": args.turn_timeout, "round_timeout": args.round_timeout,
                    "bound_margin": args.bound_margin} if args.stage == 0 else {}
        serve_stage(cfg, args.stage, args.certs, args.listen, args.next, args.checkpoint,
                    max_message_mib=args.max_message_mib, on_ready=ready, defense=_net_defense(cfg, args), **timeouts)
        return 0
    serve(cfg, args.certs, args.listen, args.checkpoint, max_message_mib=args.max_message_mib, on_ready=ready,
          turn_timeout=args.turn_timeout, round_timeout=args.round_timeout, bound_margin=args.bound_margin,
          defense=_net_defense(cfg, args), capture=args.capture)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from suite.net.parties import run_client

    cfg = _config_from_args(args)
    _preflight_single(cfg)
    bar = tqdm(total=cfg.training.steps, desc=f"client {args.id}", unit="step", file=sys.stderr,
               dynamic_ncols=True)
    last = [time.perf_counter()]

    def show(step: int, loss: float) -> None:
        now = time.perf_counter()
        bar.n = step + 1
        bar.set_postfix(loss=f"{loss:.3f}", s_per_step=f"{now - last[0]:.2f}")
        bar.refresh()
        last[0] = now

    run = run_client(cfg, args.id, args.server, args.certs, args.checkpoint, max_message_mib=args.max_message_mib,
                     give_up_after=args.give_up_after, on_step=show, defense=_net_defense(cfg, args),
                     capture=args.capture)
    bar.close()
    if run.resumed_from:
        print(f"resumed from step {run.resumed_from} (checkpoint)")
    print("losses: " + " ".join(f"{x:.6f}" for x in run.losses))
    if run.defense != "none":
        print(f"defense {run.defense}: {run.defense_report}")
    print(f"client {args.id}: {len(run.losses)} steps, loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}, "
          f"{run.reconnects} reconnects" if run.losses else f"client {args.id}: nothing to do")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitleak",
        description="Privacy attack and defence evaluation suite for split learning of LLMs.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"splitleak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one split configuration and show the loss going down", epilog=EPILOG)
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("attack", help="run one matrix cell: train a split, capture, attack, print the metrics "
                       "(memorisation attacks: train with the config's canaries, read the threat's model view)",
                       epilog=EPILOG)
    _add_run_options(p)
    p.add_argument("--threat", required=True, help="threat preset, e.g. curious_server (`splitleak list threats`)")
    p.add_argument("--attack", required=True, help="attack name, e.g. nearest_embedding (`splitleak list attacks`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="attack parameter")
    p.add_argument("--defense", default="none", help="defense name, e.g. none, encryption (`splitleak list defenses`)")
    p.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE", help="defense parameter")
    p.add_argument("--samples", type=int, default=3, help="original/reconstructed pairs to print")
    p.add_argument("--capture", metavar="FILE", help="attack this capture file (`client --capture`, or written from "
                   "another framework's traffic: docs/network.md, 'Capture files') instead of training a split here")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("generate", help="answer one prompt through a trained split (token by token over the "
                       "wire) and show what the server read of the prompt and the answer", epilog=EPILOG)
    p.add_argument("prompt", help="the prompt text")
    _add_run_options(p)
    p.add_argument("--new-tokens", type=int, help="tokens to generate (default: [inference] new_tokens, 32)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--threat", default="curious_server", help="who reads the generation (with --attack)")
    p.add_argument("--attack", help="an inversion attack to run on the generation, e.g. prefix_inversion")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="attack parameter")
    p.add_argument("--defense", default="none", help="defense name, e.g. none, encryption, dxp")
    p.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE", help="defense parameter")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run a threat-model matrix (the embedded default without CONFIG); resumes",
                       epilog=EPILOG)
    p.add_argument("config", nargs="?", help="TOML experiment config (docs/config.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="results directory (results.sqlite)")
    p.add_argument("--workers", type=int, help="parallel worker processes, one training run each "
                   "(default: the config's [executor] workers, 1 unless it says otherwise)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where training groups run: this machine, or Ray tasks (pip install 'splitleak[ray]')")
    p.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: a local one")
    p.add_argument("--no-report", action="store_true", help="skip building DIR/report.pdf (`splitleak report DIR` "
                   "builds it later)")
    p.add_argument("--retry-failed", action="store_true", help="rerun the cells whose stored row failed")
    p.add_argument("--keep-stale", action="store_true", help="reuse rows computed by another code revision "
                   "(default: such rows are reported, recomputed and replaced)")
    _add_device_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list the registered attacks, defenses, threats and named models, one line each")
    p.add_argument("kind", nargs="?", choices=LISTABLE, help="list only these")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("results", help="print the results table of a run directory", epilog=EPILOG)
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="(re)build DIR/report.pdf from a run directory's results store",
                       description="Writes DIR/report.pdf: the verdict per threat, the threat-model matrix, "
                                   "leakage versus split depth, privacy versus utility, reconstructed samples, "
                                   "attack costs and the methods.", epilog=EPILOG)
    p.add_argument("dir", metavar="DIR", help="results directory (holds results.sqlite)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baseline", help="print a baseline (metrics with bands from their intervals) of a run as JSON")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("check", help="exit 1 when privacy metrics regress against a baseline (CI gate)",
                       description="Fails when leakage under a defense rises beyond its band, or when an attack "
                                   "on an undefended split gets weaker beyond its band, naming each cell and metric. "
                                   "A metric at its floor or ceiling is checked in the direction it can move; a "
                                   "baseline with a band that can never trip is refused (exit 2).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--baseline", required=True, metavar="FILE", help="JSON written by 'splitleak baseline'")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one test case per cell and metric")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (for a pull-request comment) "
                                                              "instead of plain lines")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("certs", help="create a throwaway CA, server and client certificates (for trying out)",
                       description="Writes DIR/ca (the CA key: hand it to nobody), DIR/server (for `serve --certs`) "
                       "and DIR/client-<i> (for `client --certs ... --id <i>`): each party gets only its own "
                       "directory.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--clients", type=int, default=2, help="client certificates to create (client-0 ...)")
    p.add_argument("--host", action="append", default=["localhost", "127.0.0.1"],
                   help="name or IP the server certificate is valid for (repeatable)")
    p.add_argument("--stages", type=int, default=0, help="also S pipeline stage certificates (stage-0 ...) for "
                   "`serve --stage i`")
    p.set_defaults(func=cmd_certs)

    for name, helptext in (("serve", "run the server (trunk) as its own process: gRPC with mutual TLS"),
                           ("client", "run one client (head, tail, private shard) against a `splitleak serve`")):
        p = sub.add_parser(name, help=helptext, epilog="Client and server must be started from the same config "
                           "(model, split, data, training); the server refuses a client built from another.")
        _add_run_options(p)
        p.add_argument("--certs", required=True, metavar="DIR", help="this party's certificate directory, DIR/server "
                       "or DIR/client-<i> of `splitleak certs DIR`")
        p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory: resume from it after a crash")
        p.add_argument("--max-message-mib", type=int, default=256, help="largest message either side accepts")
        p.add_argument("--defense", help="defense both sides run (as for `attack`; default: the config's single "
                       "[matrix] defenses entry, else none); part of what client and server must agree on")
        p.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE", help="defense parameter")
        p.add_argument("--capture", metavar="FILE", help="write the messages this side sent and received (the client: "
                       "with its own batches; the server: every client's) to FILE, for `attack --capture`")
        p.add_argument("--stages", type=int, help="the server's blocks as S pipeline stages, each its own `serve "
                       "--stage i` process (as [training] stages; every party must agree)")
        if name == "serve":
            p.add_argument("--listen", default="127.0.0.1:50051", help="host:port to listen on")
            p.add_argument("--stage", type=int, metavar="I", help="run pipeline stage I of S (--stages): stage 0 "
                           "serves the clients, stage I>0 only stage I-1; --certs DIR/stage-I")
            p.add_argument("--next", metavar="HOST:PORT", help="with --stage I < S-1: the address of stage I+1")
            p.add_argument("--turn-timeout", type=float, default=30.0,
                           help="seconds a silent client keeps its turn (serial, per_client)")
            p.add_argument("--round-timeout", type=float, default=30.0,
                           help="seconds a batch_parallel round waits for the clients due, in each of its states")
            p.add_argument("--bound-margin", type=float, default=100.0,
                           help="the magnitude bound on every message: this many times the largest per-position "
                           "norm of the public base model's activations and gradients on public text")
            p.set_defaults(func=cmd_serve)
        else:
            p.add_argument("--server", default="127.0.0.1:50051", help="the server's host:port")
            p.add_argument("--id", type=int, required=True, help="this client's id (its certificate: client-ID)")
            p.add_argument("--give-up-after", type=float, default=300.0,
                           help="seconds to keep retrying an unreachable server")
            p.set_defaults(func=cmd_client)

    p = sub.add_parser(
        "bench",
        help="time a split step against a centralised step of the same model; per_client memory 1 vs 8 clients",
    )
    p.add_argument("--model", default="smollm2-135m", help="model to measure (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each step (interleaved)")
    p.add_argument("-k", "--head-blocks", type=int, default=1)
    p.add_argument("-m", "--tail-blocks", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the per_client memory measurement")
    p.add_argument("--no-remote", action="store_true", help="skip gRPC-vs-in-process and Ray overhead")
    p.add_argument("--fuzz", type=int, metavar="N", help="instead: N seeded fuzz cases against the receiving end "
                   "(channel + decoder); prints how many were rejected and how many reached the model")
    p.add_argument("--fuzz-seed", type=int, default=0, help="seed of the --fuzz cases")
    _add_device_options(p, server=False)
    p.add_argument("--model-config", metavar="NAME", help="a bundled config built with random weights instead of "
                   "--model (no download): llama-1b (Llama-3.2-1B shapes), llama-8b (Llama-3.1-8B shapes)")
    p.add_argument("--layers", type=int, help="with --model-config: keep only this many decoder blocks (CPU timing "
                   "of a model too large for memory; the per-block cost is unchanged)")
    p.add_argument("--no-strategies", action="store_true", help="skip the strategy throughput table")
    p.add_argument("--strategy-clients", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                   help="client counts of the strategy throughput table (default 1 2 4 8)")
    p.add_argument("--no-step-times", action="store_true", help="skip the split/centralised step times")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from suite.engine.quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SplitleakError as err:
        print(f"splitleak: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitleak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
