"""Transition audit: catch a server or pipeline stage whose *state* does not follow from honest training.

The integrity audit (``integrity_audit``) checks a party's outputs against the weights it committed to. A
party that trains its weights toward its own goal and then computes honestly with them passes it (an
outside review found this at S = 1). This audit checks transitions instead (``suite.engine.transitions``):

* every forward / backward pair of every audited party (the server, or each pipeline stage) is committed
  to: the digest of its whole state after the step (trainable weights, optimiser state, and the digest of
  its fixed part: frozen weights, buffers and plain module settings such as LoRA ``scaling``);
* whether a pass is a training pass is the orchestrator's word (``Session.updates``, which
  ``no_updates`` clears for the traffic capture), never the party's own ``updates`` flag: a party cannot
  declare a pass update-free to have it skipped. Update-free passes are audited too: their state must not
  change (checked on every one) and, at ``rate``, their replay must send the same messages;
* the first committed state is the party's *public build* (public base weights, LoRA A from the run's public
  seed, LoRA B zero, fresh optimiser), kept by the orchestrator when it built the parties
  (``prepare(keep_public=True)``, which ``train_split`` does for this defense), and the replica is built
  from it: a party that arrives with non-public adapters or base weights is caught at its first step. A
  session built without it falls back to the party's state at install, and the report says so
  (``initial_state``);
* on every transition (no sampling, no recomputation) the state the party starts the step from must have the
  digest of the previous transition's committed after-state: a party that changes its weights (trainable or
  frozen) or a setting between steps and then computes honestly is caught at its next step, at any ``rate``;
* after the commitment, with probability ``rate`` drawn from the OS CSPRNG (a party that knows ``rate``
  cannot tell which steps are checked), a verifier re-executes the step on its own replica from the party's
  state before the step and the messages it received in that step, and compares the state after and every
  message the party sent (``tolerance``: the largest absolute difference accepted; 0 = bit for bit, which
  CPU recomputation meets; a NaN where the replica has a number is a difference);
* ``rate = 1`` is the seed paper's redundant recomputation: every step, ~100 % detection, 2x the audited
  parties' compute. A run in which nothing was audited is not "passed": the report carries a ``warning``.

A tampered step is caught with probability ``rate`` whatever the tampering's size (above ``tolerance``) and
whether it touches outputs, gradients or the weights: a party that tampers on T steps is caught by the T-th
with probability 1 - (1 - rate)^T (T >= ln(0.01) / ln(1 - rate) for 99 %: 44 steps at rate 0.1).

``act``: a party caught is excluded and replaced by a standby: a fresh party from the public build (not the
excluded object's trunk, whose frozen weights or settings may be what it changed) that starts from the last
verified state (the state after the last transition that passed an audit, or the public initial state) and
runs honestly; the excluded object is turned into it in place, so the step functions and the stage chain
that hold it talk to the standby. The report names the steps lost (transitions between the last verified
state and the detection).

The evidence is the orchestrator's, never the party's: what a step received is the bytes its peers put on
the session's transport for it, and what it sent is what that transport carried from it (an inbox tap that
edits a received message, or a transport of the party's own that edits its replies, is a difference); the
standby gets the session's transport and the orchestrator's inbox taps only. A resumed audit
(``verified=``) trusts only the earlier audit's signed record (``VerifiedStates``). In process the replica
shares code with the party: its code is fingerprinted at ``keep_public`` and checked at each replay (a
change is flagged and voids the verdicts after it); a verifier in a separate process is the real boundary
(docs/pipeline.md).

Cost: every transition is snapshotted (its trainable weights and optimiser states copied, its frozen part
compared with the public build once, in full, at the after-state), the before-state is the last
after-state when the party still holds it (compared by value); the report gives the measured CPU cost
(``extra_compute_measured``: recording and re-execution seconds over the party's own) beside the nominal
``extra_compute`` (re-executed passes over served ones).

Who verifies: the inputs of a step are what the audited party received, which under ``batch_parallel``
include every client's activations of the pass; the verifier is a server-side standby that may see them,
not a client. ``stage``: audit only that stage (None: every server-side party).
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from suite.engine.stages import StageChain
from suite.engine.transitions import (
    PublicParty,
    Replica,
    Snapshot,
    Transition,
    TransitionRecorder,
    become_standby,
    difference,
    messages_differ,
    within,
)
from suite.errors import ConfigError, ProtocolError
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class TransitionAuditConfig(DefenseConfig):
    rate: float = 0.1  # probability that one transition of an audited party is re-executed
    stage: int | None = None  # the stage to audit (None: every stage, or the one server)
    tolerance: float = 0.0  # largest absolute difference accepted between recomputed and committed values
    act: bool = True  # exclude a caught party and resume from the last verified state with a standby
    seed: int | None = None  # None: the audit schedule comes from the OS CSPRNG (tests fix it)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")


# The key this process's audits sign their records of verified states with (``VerifiedStates``): a record
# that reaches a resumed audit was made by an audit of this process, not assembled by a party. In process a
# party can read it, as it can patch any shared code (docs/pipeline.md); a separate-process verifier keeps it.
_RECORD_KEY = secrets.token_bytes(32)


def _sign(digests: Mapping[int, bytes]) -> bytes:
    body = b"".join(b"%d:" % i + digests[i] for i in sorted(digests))
    return hmac.new(_RECORD_KEY, b"splitleak-verified-v1|" + body, hashlib.sha256).digest()


class VerifiedStates(Mapping):
    """An audit's record of the last verified state of every audited stage (stage -> ``Snapshot``), with the
    digests the audit took when it verified them, signed by the audit (``_RECORD_KEY``): what a resumed audit
    accepts as its first committed states (``TransitionAuditDefense(verified=...)``). A snapshot changed
    after the record was made, a stage added, or a record not made by an audit is refused."""

    def __init__(self, states: Mapping[int, Snapshot]):
        self._states = dict(states)
        self.digests = {i: s.digest(cached=False) for i, s in self._states.items()}
        self.signature = _sign(self.digests)

    def __getitem__(self, stage: int) -> Snapshot:
        return self._states[stage]

    def __iter__(self):
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def check(self) -> None:
        """ConfigError unless the record is an audit's and every snapshot is the one it verified."""
        if not hmac.compare_digest(_sign(self.digests), self.signature):
            raise ConfigError("transition_audit verified= record is not signed by an audit of this process: resume "
                              "only from the earlier audit's verified_states()")
        for i, snap in self._states.items():
            if snap.digest(cached=False) != self.digests.get(i):
                raise ConfigError(f"transition_audit verified= state of stage {i} changed after the audit "
                                  "verified it: resume from the earlier audit's verified_states() as it was")


@register_defense("transition_audit")
class TransitionAuditDefense(Defense):
    Config = TransitionAuditConfig
    keeps_public = True  # the replicas and the first committed states come from the parties' public builds

    def __init__(self, config: TransitionAuditConfig | None = None, verified: VerifiedStates | None = None):
        """``verified``: on resume, the last verified state of every audited stage (``verified_states()`` of
        the audit that ran before the checkpoint, as it returned it): the first committed states, instead of
        the public build. A resumed audit trusts that record (signed by the audit, checked against the digests
        it took) and that the states' fixed part is the public build's; not the party, nor a plain dict."""
        super().__init__(config)
        self._resume = verified
        c = self.config
        self._draw = random.Random(c.seed) if c.seed is not None else secrets.SystemRandom()
        self.parties: dict[int, tuple] = {}  # stage -> (live party, replica, share of the trunk's blocks, public)
        self.last_verified: dict[int, tuple[int, object]] = {}  # stage -> (transition index, snapshot)
        self.committed: dict[int, object] = {}  # stage -> the state its next transition must start from
        self.transitions = 0  # training transitions seen (every audited party)
        self.update_free = 0  # passes the orchestrator ran without updates (traffic capture), every party
        self.audited: list[tuple[int, int]] = []  # (stage, transition index) of audited training transitions
        self.audited_update_free = 0
        self.flags: list[dict] = []
        self.replacements: list[dict] = []
        self.units_served = 0.0  # compute of the audited parties' training transitions, in trunk passes
        self.units_recomputed = 0.0  # compute of the re-executions, likewise
        self.passes: dict[int, int] = {}  # training transitions per audited party
        self.seconds_recomputing = 0.0
        self.initial_state = "public build"  # where the first committed states came from
        self.shared_code_changed: list[dict] = []  # replays whose replica found the code it runs changed
        self._session = None
        self._link = None  # the orchestrator's transport between the parties
        self._recorders: list[TransitionRecorder] = []  # every recorder (their times add up)
        self._recording: dict[int, TransitionRecorder] = {}  # stage -> the recorder of its current party

    def install(self, session) -> None:
        server = session.server
        stages = server.stages if isinstance(server, StageChain) else [server]
        if self.config.stage is not None and self.config.stage >= len(stages):
            raise ValueError(f"transition_audit stage {self.config.stage} does not exist: training.stages = "
                             f"{len(stages)}")
        public = getattr(session, "public", None)
        if public is None or len(public) != len(stages):
            # No public build kept (a session built without keep_public): the party's state now is the best
            # there is, and it is the party's word; the report says so.
            lr = session.config.finetune.lr_of(session.config.finetune.server)
            public = [PublicParty.of(s, lr) for s in stages]
            self.initial_state = "copied from the parties at install (not attested: build with keep_public)"
        if self._resume is None and getattr(session, "losses", None):
            raise ConfigError(f"transition_audit installed on a session that already trained {len(session.losses)} "
                              "steps: its first state would be the party's word; install it before training, or "
                              "resume with TransitionAuditDefense(config, verified=<the last audit's "
                              "verified_states()>)")
        if self._resume is not None:
            if not isinstance(self._resume, VerifiedStates):
                raise ConfigError(f"transition_audit verified= must be the earlier audit's verified_states(), got "
                                  f"a {type(self._resume).__name__}: a resumed audit trusts only its own record")
            self._resume.check()
            wanted = [i for i in range(len(stages)) if self.config.stage in (None, i)]
            missing = [i for i in wanted if i not in self._resume]
            if missing:
                raise ConfigError(f"transition_audit verified= has no verified state for stage(s) {missing}: resume "
                                  "from the verified_states() of an audit of the same stages")
            self.initial_state = "last verified states (resumed)"
        self._session = session
        self._link = session.transport
        blocks = [len(s.trunk.blocks.layers) for s in stages]
        total = sum(blocks) or 1
        for i, party in enumerate(stages):
            share = blocks[i] / total
            if self.config.stage is not None and i != self.config.stage:
                continue
            replica = Replica(public[i])  # the public build: public weights, adapter configuration, initial state
            self.parties[i] = (party, replica, share, public[i])
            first = replica.initial if self._resume is None else self._resume[i]
            if first.fixed != replica.initial.fixed:
                raise ConfigError(f"transition_audit verified= state of stage {i} has frozen weights or settings "
                                  "other than the public build's: resume from an audit of the same model and split")
            self.last_verified[i] = (-1, first)
            self.committed[i] = first  # the state its first transition must start from
            self._record(i)

    def _record(self, stage: int, start: int = 0) -> None:
        party, replica = self.parties[stage][:2]
        session = self._session
        # training pass or not: the orchestrator's word (Session.updates), never the party's own flag
        recorder = TransitionRecorder(party, lambda t, i=stage: self._on_transition(i, t),
                                      updates=lambda: getattr(session, "updates", True), public=replica.public,
                                      start=start, link=self._link, wiring=self.parties[stage][3].wiring)
        self._recorders.append(recorder)
        self._recording[stage] = recorder

    def _on_transition(self, stage: int, t: Transition) -> None:
        party, replica, share, _ = self.parties[stage]
        if t.updates:
            self.transitions += 1
            self.units_served += share
            self.passes[stage] = self.passes.get(stage, 0) + 1
        else:
            self.update_free += 1
        committed, self.committed[stage] = self.committed[stage], t.after
        if t.before.digest() != committed.digest():  # it did not start where its last step ended
            self._flag(stage, t, difference(committed, t.before), 0.0, start=True)
            return
        if t.after.fixed != t.before.fixed:  # its frozen weights or settings changed during the step
            self._flag(stage, t, float("inf"), 0.0, start=False)
            return
        if not t.updates and t.after.digest() != t.before.digest():  # an update-free pass changed its state
            self._flag(stage, t, difference(t.before, t.after), 0.0, start=False)
            return
        if self._draw.random() >= self.config.rate:  # drawn after the party committed (t.commitment)
            return
        start = time.process_time()
        if replica.code_changed():
            # the replica runs code that changed since it was built (a class patched in process, a hook on the
            # public copy): its verdicts are void, and the party shares that code
            self.shared_code_changed.append({"stage": stage, "transition": t.index})
            self._flag(stage, t, float("inf"), float("inf"), start=False, code=True)
            return
        try:
            honest = replica.replay(t)
        except ProtocolError:  # what crossed the link for it is not what a step consumes
            honest = None
        self.seconds_recomputing += time.process_time() - start
        if t.updates:
            self.units_recomputed += share
            self.audited.append((stage, t.index))
        else:
            self.audited_update_free += 1
        if honest is None:
            self._flag(stage, t, float("inf"), float("inf"), start=False)
            return
        state_off = difference(honest.after, t.after)
        sent_off = messages_differ(honest.sent, t.sent)
        if within(state_off, self.config.tolerance) and within(sent_off, self.config.tolerance):
            self.last_verified[stage] = (t.index, t.after)
            return
        self._flag(stage, t, state_off, sent_off, start=False)

    def _flag(self, stage: int, t: Transition, state_off: float, sent_off: float, start: bool,
              code: bool = False) -> None:
        """Record a caught transition (``start``: its state before was not the last committed after-state) and,
        with ``act``, exclude the party: a standby built from the public build takes its place from the last
        verified state."""
        step = min(t.steps.values()) if t.steps else None
        self.flags.append({"stage": stage, "transition": t.index, "step": step, "state_difference": state_off,
                           "message_difference": sent_off, "start_mismatch": start, "training": t.updates,
                           "shared_code_changed": code})
        if self.config.act:
            party, replica, share, public = self.parties[stage]
            verified_at, state = self.last_verified[stage]
            self._recording[stage].detach()  # the excluded party's recorder: the standby's records anew
            # the same object, now a fresh party on the orchestrator's link with its taps only: runs honestly
            become_standby(party, public, state, self._link if self._link is not None else party.transport)
            party.updates = bool(getattr(self._session, "updates", True))  # the orchestrator's word (capture)
            chain = self._session.server if self._session is not None else None
            if isinstance(chain, StageChain):
                chain.trunk.parts[stage] = party.trunk  # evaluation without the wire uses the standby's trunk
            self.committed[stage] = state  # its next transition starts from there
            self._record(stage, t.index + 1)  # audited from here, numbered on from the excluded party's
            self.replacements.append({"stage": stage, "at_transition": t.index, "step": step,
                                      "resumed_from": verified_at, "steps_lost": t.index - verified_at})

    def verified_states(self) -> VerifiedStates:
        """The last verified state of every audited stage, signed with the digests this audit took: what a
        checkpoint keeps for a resumed audit (``verified=``)."""
        return VerifiedStates({i: state for i, (_, state) in self.last_verified.items()})

    def flagged_steps(self) -> set[int]:
        return {f["step"] for f in self.flags}

    def report(self) -> dict:
        out = {"rate": self.config.rate, "stages_audited": sorted(self.parties), "transitions": self.transitions,
               "audited": len(self.audited), "update_free_transitions": self.update_free,
               "update_free_audited": self.audited_update_free, "flagged": len(self.flags),
               "flags": self.flags[:20], "replacements": self.replacements, "initial_state": self.initial_state,
               "verifier": "server-side standby replica (sees the audited party's inputs; in process it shares "
                           "code with the party: docs/pipeline.md)",
               "shared_code_changed": self.shared_code_changed[:20],
               # re-execution over the audited parties' own compute (about ``rate``), and over the whole
               # trunk's (every stage's) compute: the price of auditing only some stages is lower
               "extra_compute": self.units_recomputed / self.units_served if self.units_served else 0.0,
               "extra_compute_trunk": (self.units_recomputed / max(self.passes.values())) if self.passes else 0.0,
               "seconds_recomputing": round(self.seconds_recomputing, 4)}
        # measured: CPU seconds of the recording (snapshots, commitments) and of the re-executions, over the
        # audited parties' own forward / backward seconds
        party = sum(r.seconds_party for r in self._recorders)
        recording = sum(r.seconds_recording for r in self._recorders)
        out["seconds_recording"] = round(recording, 4)
        out["extra_compute_measured"] = round((recording + self.seconds_recomputing) / party, 4) if party else 0.0
        if self.shared_code_changed:
            out["warning"] = (f"the verifier's code changed during the run (at transitions "
                              f"{[c['transition'] for c in self.shared_code_changed[:5]]}): an in-process replica "
                              "shares code with the party, so verdicts from there on are void "
                              "(docs/pipeline.md, the in-process limit)")
        elif not self.transitions or not self.audited:
            # nothing checked is not "passed": say so where the verdict is read
            out["warning"] = (f"{self.transitions} training transitions recorded, {len(self.audited)} audited: "
                              "the audit checked nothing" + ("" if self.transitions else
                                                            " (no training pass reached an audited party)"))
        return out
