"""Where a proxied call is opened (its rollout and place in it) and closed (its rows handed to the
batch writer). Both lanes use it. The proxy never waits on Postgres here."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any

from lightloop.proxy.attribution import Attribution
from lightloop.proxy.capture import Call, Outcome, build_rows
from lightloop.proxy.errors import TooManyRollouts
from lightloop.proxy.export import SpanExport
from lightloop.proxy.sessions import SessionIndex, chain
from lightloop.proxy.spans import new_span_id, trace_context
from lightloop.store import BatchWriter


def new_rollout_id() -> str:
    return f"session-{uuid.uuid4().hex}"


class _Lru(OrderedDict[str, Any]):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)


class Recorder:
    def __init__(
        self,
        writer: BatchWriter,
        memory: int,
        export: SpanExport | None = None,
        enabled: bool = True,
        max_in_flight: int = 0,
        idle_s: float = 600.0,
    ) -> None:
        self.writer = writer
        self.enabled = enabled
        # Train rollouts started and not finished, with when each was last used: capping them
        # bounds how stale the trainer's data can get (rollouts served by old versions).
        self.max_in_flight = max_in_flight
        self.idle_s = idle_s
        self._in_flight: OrderedDict[str, float] = OrderedDict()
        self.sessions = SessionIndex(memory)
        self.export = export
        # Per rollout: the next seq. Also tells which rollouts this process has already written.
        self._next_seq = _Lru(memory)
        # Ids handed out recently, so a reward naming one can wait for its rows to be written.
        self._recent_responses = _Lru(memory)
        # The rollout of each trace an agent sent calls in (W3C traceparent): its own spans of
        # that trace, sent by OTLP without a rollout id, are tied to the rollout by it.
        self._trace_rollouts = _Lru(memory)

    def open(
        self,
        attribution: Attribution,
        *,
        operation: str,
        provider: str,
        requested_model: str,
        served_model: str,
        policy_version: int | None,
        request: dict[str, Any],
        traceparent: bytes | None,
        admit: bool = False,
    ) -> Call:
        """Open a call. `admit`: the call is about to be served, so it counts against (and may be
        refused by) the cap on rollouts in flight."""
        rollout_id = attribution.rollout_id
        session_keys = None
        if rollout_id is None:
            messages = request.get("messages")
            if isinstance(messages, list):
                # Kept on the call: remembering its reply at close then hashes the reply alone.
                session_keys = chain(messages)
                rollout_id = self.sessions.find(messages, session_keys)
            if rollout_id is None:
                rollout_id = new_rollout_id()
        # The queue's rollouts (the path form with an attempt) are capped by the queue instead.
        if admit and self.max_in_flight and attribution.mode == "train" and attribution.attempt is None:
            self._admit(rollout_id)
        seq = self._next_seq.get(rollout_id)
        if seq is None and self.enabled:
            seq = 0
            # First sight in this process. Another process (or an agent) may have written the
            # rollout already; the writer then keeps the existing row.
            self.writer.submit(
                "rollouts",
                {
                    "id": rollout_id,
                    "group_id": attribution.group_id,
                    "task_id": attribution.task_id,
                    "agent": attribution.agent,
                    "mode": attribution.mode,
                    "group_size": attribution.group_size,
                    "metadata": {"attribution": attribution.source},
                },
            )
        seq = seq or 0
        self._next_seq.put(rollout_id, seq + 1)
        trace_id, parent = trace_context(traceparent)
        if parent is not None:  # the agent's trace (a valid traceparent), not a new one
            self._note_trace(trace_id, rollout_id)
        return Call(
            span_id=new_span_id(),
            trace_id=trace_id,
            parent_span_id=parent,
            operation=operation,
            provider=provider,
            rollout_id=rollout_id,
            attribution=attribution,
            seq=seq,
            requested_model=requested_model,
            served_model=served_model,
            policy_version=policy_version,
            request=request,
            started_ns=time.time_ns(),
            session_keys=session_keys,
        )

    def close(
        self,
        call: Call,
        outcome: Outcome | None,
        *,
        aborted: bool = False,
        error: tuple[str, str, dict[str, Any]] | None = None,
        ended_ns: int | None = None,
    ) -> None:
        if not self.enabled:
            return
        span, rows = build_rows(call, outcome, ended_ns or time.time_ns(), aborted=aborted, error=error)
        self.writer.submit("spans", span)
        for row in rows:
            self.writer.submit("llm_calls", row)
        if outcome is not None:
            if outcome.response_id:
                self._recent_responses.put(outcome.response_id, call.rollout_id)
            messages = call.request.get("messages")
            # Only conversations the proxy had to infer need remembering: an agent that names
            # its rollouts keeps naming them.
            if call.attribution.source == "session" and isinstance(messages, list) and error is None:
                for choice in outcome.choices:
                    self.sessions.remember(messages, choice.message(), call.rollout_id, call.session_keys)
        if self.export is not None:
            self.export.export(span)

    def _admit(self, rollout_id: str) -> None:
        now = time.monotonic()
        if rollout_id in self._in_flight:
            self._in_flight[rollout_id] = now
            self._in_flight.move_to_end(rollout_id)
            return
        while self._in_flight and next(iter(self._in_flight.values())) < now - self.idle_s:
            self._in_flight.popitem(last=False)
        if len(self._in_flight) >= self.max_in_flight:
            raise TooManyRollouts(
                f"{len(self._in_flight)} rollouts are in flight (LIGHTLOOP_PROXY__MAX_ROLLOUTS_IN_FLIGHT); "
                "finish one (POST /v1/rollouts/{id}/finish) before starting another"
            )
        self._in_flight[rollout_id] = now

    def rollout_of_trace(self, trace_id: str) -> str | None:
        found = self._trace_rollouts.get(trace_id)
        return found if isinstance(found, str) and found else None

    def rollout_of_span(self, span: dict[str, Any]) -> str | None:
        """The rollout an agent's span names no rollout for belongs to: the call it reports (its
        `gen_ai.response.id` is the id this proxy answered with: GenAI instrumentations, AgentOps
        and OpenLLMetry record it), else the trace it shares with a call. A span tied by its
        response id ties its trace too, so the agent's other spans follow."""
        response_id = (span.get("attributes") or {}).get("gen_ai.response.id")
        rollout = self._recent_responses.get(response_id) if isinstance(response_id, str) else None
        if isinstance(rollout, str):
            self._note_trace(span["trace_id"], rollout)
            return rollout
        return self.rollout_of_trace(span["trace_id"])

    def _note_trace(self, trace_id: str, rollout_id: str) -> None:
        known = self._trace_rollouts.get(trace_id)
        # A trace that spans several rollouts names none of them ("").
        self._trace_rollouts.put(trace_id, rollout_id if known in (None, rollout_id) else "")

    def handed_out(self, rollout_id: str) -> None:
        """The queue made this rollout's row: its calls need not write one."""
        if rollout_id not in self._next_seq:
            self._next_seq.put(rollout_id, 0)

    def finished(self, rollout_id: str) -> None:
        self._in_flight.pop(rollout_id, None)

    def knows(self, rollout_id: str | None, response_id: str | None) -> bool:
        """Whether rows for this rollout or response may still be in the writer's queue."""
        return (rollout_id is not None and rollout_id in self._next_seq) or (
            response_id is not None and response_id in self._recent_responses
        )
