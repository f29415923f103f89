"""One client cannot poison or wedge the server, each case over gRPC + mutual TLS
with the real service in process (threads): a malicious client sends a huge activation or gradient, an
overlong or too-wide message, a gradient that would make the trunk non-finite, or stays silent, sends a
malformed gradient, or crashes and resumes in a round it was served alone. It gets a clear error (or is
dropped), and the honest clients finish training with a falling loss, in bounded time, on a finite trunk."""

import threading
import time

import grpc  # a dependency: no skip
import pytest
import torch

from suite.cli import _config_from_args, build_parser
from suite.engine.protocol import TO_SERVER, ActivationMsg, Bounds, GradientMsg, decode, encode
from suite.engine.transport import SERVER
from suite.net.certs import load_identity, make_certs
from suite.net.link import Link, LinkError, RemoteTransport
from suite.net.parties import build_service, config_hash, run_client
from suite.net.server import start_server

STEPS = 8
ARGS = ["--model", "tiny-llama", "-k", "1", "-m", "1", "--clients", "3", "--batch-size", "2", "--max-length", "12",
        "--private-size", "18", "--steps", str(STEPS), "--lr", "0.01"]
HIDDEN = 64  # tiny-llama's hidden size
BUDGET = 60.0  # seconds the honest clients may take (they need a few; a wedged server holds them forever)


class _Run:
    """A service in this process, honest clients 0 and 1 in threads, and a hand-driven client 2."""

    def __init__(self, tmp_path, strategy: str = "batch_parallel", round_timeout: float = 30.0, **service):
        assert grpc is not None
        self.certs = make_certs(tmp_path / "certs", clients=3)
        self.cfg = _config_from_args(build_parser().parse_args(["train", *ARGS, "--strategy", strategy]))
        self.service = build_service(self.cfg, round_timeout=round_timeout, **service)
        self.server, port = start_server(self.service, load_identity(self.certs, "server"), "127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.runs, self.failures, self.threads = {}, {}, []

    def connect(self, i: int = 2) -> RemoteTransport:
        transport = RemoteTransport(Link(self.address, load_identity(self.certs, f"client-{i}")), i,
                                    config_hash(self.cfg))
        transport.connect()
        return transport

    def start(self, *ids: int) -> None:
        def honest(i: int) -> None:
            try:
                self.runs[i] = run_client(self.cfg, i, self.address, self.certs, give_up_after=BUDGET)
            except Exception as err:  # reported by finish()
                self.failures[i] = err

        for i in ids:
            t = threading.Thread(target=honest, args=(i,), daemon=True)  # a wedged one must not block exit
            t.start()
            self.threads.append(t)

    def finish(self, start: float, ids=(0, 1)) -> None:
        """The clients ``ids`` trained every step, with a falling loss, within the budget; the trunk is finite."""
        for t in self.threads:
            t.join(timeout=max(0.1, start + BUDGET - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), f"clients still training after {BUDGET:.0f} s (wedged)"
        assert not self.failures, self.failures
        for i in ids:
            losses = self.runs[i].losses
            assert len(losses) == STEPS and all(x == x for x in losses), losses
            assert sum(losses[-3:]) < sum(losses[:3]), f"client {i}'s loss did not fall: {losses}"
        assert_finite(self.service)

    def close(self) -> None:
        self.server.stop(grace=0)


def assert_finite(service) -> None:
    bad = [n for n, p in service.server.trunk.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, f"non-finite trunk parameters: {bad[:5]}"


def _act(hidden: torch.Tensor, client: int = 2, step: int = 0) -> bytes:
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    return encode(ActivationMsg(client, step, TO_SERVER, hidden, mask, torch.arange(hidden.shape[1]).expand_as(mask)))


def _refused(transport: RemoteTransport, data: bytes) -> str:
    transport.send("client/2", SERVER, data)
    with pytest.raises(LinkError) as err:
        transport.recv("client/2", SERVER)
    return str(err.value)


def _good_activation_then(transport: RemoteTransport, grad) -> str:
    """Send a valid activation; answer the reply with ``grad(hidden)``; the error the gradient earns."""
    transport.send("client/2", SERVER, _act(torch.randn(2, 12, HIDDEN)))
    hidden = decode(transport.recv("client/2", SERVER)).hidden
    return _refused(transport, encode(GradientMsg(2, 0, TO_SERVER, grad(hidden))))


# The old server checked finite values only: each of these was accepted (3e38 turned the trunk to NaN).
POISON = {
    "huge_activation": (lambda t: _refused(t, _act(torch.full((2, 12, HIDDEN), 3e38))), "magnitude bound"),
    "huge_gradient": (lambda t: _good_activation_then(t, lambda h: torch.full_like(h, 3e38)), "magnitude bound"),
    "overlong": (lambda t: _refused(t, _act(torch.zeros(1, 200_000, HIDDEN, dtype=torch.float16))),
                 "length 200000 exceeds the length bound: at most 12"),
    "too_many_rows": (lambda t: _refused(t, _act(torch.zeros(64, 12, HIDDEN))),
                      "64 rows exceeds the row bound: at most 2"),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_a_huge_or_oversized_message_is_refused_and_the_others_train(tmp_path, case):
    run = _Run(tmp_path)
    bounds = run.service.server.bounds
    assert bounds.rows == 2 and bounds.length == 12 and 0 < bounds.activation_norm < 1e6
    assert 0 < bounds.gradient_norm < 1e6  # measured on public text through the public base model, x100
    attack, expected = POISON[case]
    try:
        start = time.monotonic()
        run.start(0, 1)
        error = attack(run.connect())
        run.finish(start)
    finally:
        run.close()
    assert "INVALID_ARGUMENT" in error and expected in error, error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("strategy", ["batch_parallel", "serial"])
def test_an_update_that_would_make_the_trunk_non_finite_is_never_applied(tmp_path, strategy):
    """Even a gradient that slips under the message bounds (here: no magnitude bound at all) never reaches
    the trunk's weights when the update it makes is not finite: its sender is dropped with an error."""
    run = _Run(tmp_path, strategy)
    run.service.server.bounds = Bounds(rows=2, length=12)  # rows and length only
    try:
        start = time.monotonic()
        run.start(0, 1)
        error = _good_activation_then(run.connect(), lambda h: torch.full_like(h, 3e38))
        run.finish(start)
    finally:
        run.close()
    assert "INVALID_ARGUMENT" in error and "would have made trunk values non-finite" in error, error


ROUND = 2.0  # the round timeout of the wedge tests (seconds)


def _alone_in_a_round(run: _Run) -> RemoteTransport:
    """Client 2 sends its activation before anyone else: the round forwards it alone after ROUND seconds."""
    bad = run.connect()
    bad.send("client/2", SERVER, _act(torch.randn(2, 12, HIDDEN)))
    decode(bad.recv("client/2", SERVER))
    assert run.service.round.state == "forwarded" and list(run.service.round.arrived) == [2]
    return bad


def test_a_client_that_never_comes_holds_up_one_round_not_every_one(tmp_path):
    run = _Run(tmp_path, round_timeout=ROUND)  # 3 clients due; client 2 never sends anything
    try:
        start = time.monotonic()
        run.start(0, 1)
        run.finish(start)
        elapsed = time.monotonic() - start
    finally:
        run.close()
    assert elapsed < STEPS * ROUND / 2, elapsed  # waiting for it every round would take STEPS * ROUND
    assert sum("closed at its deadline without clients [2]" in e for e in run.service.events) == 1


@pytest.mark.parametrize("case", ["silent", "malformed", "crash_and_resume"])
def test_one_client_cannot_wedge_batch_parallel(tmp_path, case):
    run = _Run(tmp_path, round_timeout=ROUND)
    try:
        bad = _alone_in_a_round(run)
        start = time.monotonic()
        error = None
        if case == "malformed":
            error = _refused(bad, encode(GradientMsg(2, 0, TO_SERVER, torch.full((2, 12, HIDDEN), float("nan")))))
        elif case == "crash_and_resume":
            bad.link.close()  # it dies holding its place in the round, then starts again from scratch
            run.start(2)
        run.start(0, 1)
        run.finish(start, ids=(0, 1, 2) if case == "crash_and_resume" else (0, 1))
        if case == "silent":  # it wakes up long after: its round is gone, and it is told why
            error = _refused(bad, encode(GradientMsg(2, 0, TO_SERVER, torch.zeros(2, 12, HIDDEN))))
    finally:
        run.close()
    events = "\n".join(run.service.events)
    if case == "silent":
        assert "FAILED_PRECONDITION" in error and "sent no gradient within the round timeout" in error, error
    elif case == "malformed":
        assert "INVALID_ARGUMENT" in error and "NaN" in error, error
    else:
        assert "reconnected before sending its gradient" in events
    assert "aborted: no client of the round sent a usable gradient" in events  # nothing was applied for it
    assert run.service.round.state == "collecting" and not run.service.round.arrived  # idle, not wedged


def test_in_one_pass_only_the_poisoning_client_is_refused():
    """Server.backward over a shared pass: the client whose gradient would make the update non-finite is
    found (each client's rows alone), gets no reply and no update; the honest client is answered and its
    update applied; no trunk value becomes non-finite."""
    from suite.engine.parties import UpdateRefused
    from suite.engine.split import SplitSpec
    from suite.experiment.prepared import prepare

    cfg = _config_from_args(build_parser().parse_args(["train", *ARGS, "--clients", "2",
                                                       "--strategy", "batch_parallel"]))
    session = prepare(cfg, SplitSpec(1, 1)).session
    server, (honest, poisoner) = session.server, session.clients
    before = {n: p.detach().clone() for n, p in server.trunk.named_parameters() if p.requires_grad}
    honest.send_activations(0)
    poisoner.send_activations(0)
    server.forward([0, 1], 0)
    honest.receive_hidden(0)
    shape = decode(session.transport.recv(poisoner.endpoint, SERVER)).hidden.shape
    session.transport.send(poisoner.endpoint, SERVER, encode(GradientMsg(1, 0, TO_SERVER, torch.full(shape, 3e38))))
    with pytest.raises(UpdateRefused, match="client 1: its gradient would have made trunk values non-finite") as err:
        server.backward()
    assert set(err.value.clients) == {1}
    honest.receive_gradient(0)  # its reply came
    assert session.transport.pending() == 0  # and none for the poisoner
    changed = [n for n, p in server.trunk.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the honest client's update was applied
    bad = [n for n, p in server.trunk.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad


def test_an_activation_in_another_dtype_is_cast_to_the_trunks_or_refused():
    """A float32 activation sent to a bfloat16 trunk used to break the whole trunk pass (every client's round
    aborted); it is cast to the trunk's dtype, and refused in one line when its values overflow that dtype."""
    from suite.engine.models import tiny_model
    from suite.engine.parties import Server
    from suite.engine.protocol import TO_SERVER, ActivationMsg, encode
    from suite.engine.split import SplitSpec, split_model
    from suite.engine.transport import SERVER, InProcessTransport, client_endpoint
    from suite.errors import ProtocolError

    mask = torch.ones(2, 6, dtype=torch.long)
    for step, (dtype, value) in enumerate(((torch.bfloat16, 0.5), (torch.float16, 1e5))):
        model = tiny_model("llama").model.to(dtype)
        transport = InProcessTransport()
        server = Server(split_model(model, SplitSpec(1, 1)).server_trunk, transport, lr=1e-3)
        hidden = torch.full((2, 6, 64), value, dtype=torch.float32)
        transport.send(client_endpoint(0), SERVER, encode(ActivationMsg(0, step, TO_SERVER, hidden, mask)))
        if dtype == torch.bfloat16:
            server.forward([0], step)  # the pass runs, in the trunk's dtype
            assert server._pending[2].dtype == torch.bfloat16
        else:
            with pytest.raises(ProtocolError, match="does not fit the trunk's torch.float16"):
                server.forward([0], step)


def test_float16_training_is_refused_in_one_line():
    from suite.engine.models import tiny_model
    from suite.engine.split import SplitSpec
    from suite.engine.training import FinetuneConfig, TrainConfig, build_session
    from suite.errors import ConfigError

    model = tiny_model("llama").model.to(torch.float16)
    data = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
            "labels": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(ConfigError, match="float16 weights cannot be fine-tuned"):
        build_session(model, SplitSpec(1, 1), [data], TrainConfig(clients=1, steps=1))
    client_frozen = TrainConfig(clients=1, steps=1, finetune=FinetuneConfig(client="frozen"))  # the server trains
    with pytest.raises(ConfigError, match="float16 weights cannot be fine-tuned"):
        build_session(model, SplitSpec(1, 1), [data], client_frozen)
