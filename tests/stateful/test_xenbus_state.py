"""Hypothesis drives a backend and a frontend machine through arbitrary peer states,
restarts and unplugs: every move is legal, and whenever both ends are settled after a
restart the pair reconnects."""
from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ringfence.xenbus.paths import DevicePaths, parse_backend_path, parse_frontend_path
from ringfence.xenbus.state import (ALLOWED, Action, IllegalTransition, Role, XenbusMachine,
                                    XenbusState as S, refused_handshake_delay)

import pytest


def converge(back: XenbusMachine, front: XenbusMachine, rounds: int = 10) -> None:
    for _ in range(rounds):
        front.on_peer(back.state)
        back.on_peer(front.state)


def test_handshake_connects_and_closes():
    back, front = XenbusMachine(Role.BACKEND), XenbusMachine(Role.FRONTEND)
    assert back.start().actions == (Action.PUBLISH_FEATURES,) and back.state == S.InitWait
    front.start()
    assert front.on_peer(back.state).actions == (Action.CONNECT,) and front.state == S.Initialised
    assert back.on_peer(front.state).actions == (Action.CONNECT,) and back.state == S.Connected
    assert front.on_peer(back.state).actions == (Action.START,) and front.state == S.Connected
    front.close()
    back.on_peer(front.state)
    assert back.state == S.Closing
    front.on_peer(back.state)
    back.on_peer(front.state)
    assert (front.state, back.state) == (S.Closed, S.Closed)


def test_restarted_backend_makes_the_frontend_reconnect():
    back, front = XenbusMachine(Role.BACKEND), XenbusMachine(Role.FRONTEND)
    back.start(); front.start()
    converge(back, front)
    assert (back.state, front.state) == (S.Connected, S.Connected)
    new_back = XenbusMachine(Role.BACKEND)  # the driver domain was relaunched
    new_back.start()
    step = front.on_peer(new_back.state)
    assert step.actions == (Action.DISCONNECT, Action.CONNECT) and front.state == S.Initialised
    converge(new_back, front)
    assert (new_back.state, front.state) == (S.Connected, S.Connected)
    assert front.connections == 2


def test_a_backend_that_refuses_the_handshake_gets_another_one():
    """The frontend's Initialised met by a backend that closes (it read a stale Connected, or
    judged the keys bad): the frontend starts over from Initialising, and the pair connects.
    The drivers wait refused_handshake_delay between the tries: the first at once, then
    growing, never past a second."""
    back, front = XenbusMachine(Role.BACKEND), XenbusMachine(Role.FRONTEND)
    back.start(); front.start()
    front.on_peer(back.state)
    assert front.state == S.Initialised
    back.apply(back.close())
    back.move(S.Closed)
    converge(back, front)
    assert (back.state, front.state) == (S.Connected, S.Connected)
    delays = [refused_handshake_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.0, 0.02, 0.04] and delays == sorted(delays) and delays[-1] == 1.0


def test_illegal_moves_are_refused():
    m = XenbusMachine(Role.FRONTEND)
    with pytest.raises(IllegalTransition):
        m.move(S.Connected)


def test_paths():
    p = DevicePaths("vbd", 5, 1, 51712)
    assert p.backend == "/local/domain/1/backend/vbd/5/51712"
    assert p.frontend == "/local/domain/5/device/vbd/51712"
    assert parse_backend_path(p.backend + "/state") == p
    assert parse_frontend_path(p.frontend_key("ring-ref")) == DevicePaths("vbd", 5, -1, 51712)
    assert parse_backend_path("/local/domain/x/backend/vbd/5/1") is None
    assert p.queue_key(1, "ring-ref", queues=4).endswith("/queue-1/ring-ref")


class Pair(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.back, self.front = XenbusMachine(Role.BACKEND), XenbusMachine(Role.FRONTEND)
        self.back.start()
        self.front.start()

    @rule(state=st.sampled_from(list(S)))
    def frontend_sees_arbitrary_backend_state(self, state):
        self.front.on_peer(state)  # must never raise: any state a hostile peer writes

    @rule(state=st.sampled_from(list(S)))
    def backend_sees_arbitrary_frontend_state(self, state):
        self.back.on_peer(state)

    @rule()
    def exchange(self):
        converge(self.back, self.front, 1)

    @rule()
    def restart_backend(self):
        self.back = XenbusMachine(Role.BACKEND)
        self.back.start()

    @rule()
    def frontend_closes(self):
        self.front.close()

    @rule()
    def unplug(self):
        self.back.online = False

    @invariant()
    def history_is_legal(self):
        for m in (self.back, self.front):
            states = m.history + [m.state]
            for a, b in zip(states, states[1:]):
                assert b in ALLOWED[m.role][a]

    @invariant()
    def settles_connected_when_online(self):
        if self.back.online and self.front.state not in (S.Closing,):
            back = XenbusMachine(Role.BACKEND, self.back.state, True, list(self.back.history))
            front = XenbusMachine(Role.FRONTEND, self.front.state, True, list(self.front.history))
            converge(back, front, 12)
            if back.state == S.Closed and front.state == S.Closed:
                return  # a closed pair waits for the toolstack
            assert (back.state, front.state) == (S.Connected, S.Connected), (back.state, front.state)


TestPair = Pair.TestCase
TestPair.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
