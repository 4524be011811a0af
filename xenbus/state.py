"""XenbusState and the handshake as a sans-IO state machine, for both roles.

The table of legal moves of one's own ``state`` node is explicit (``ALLOWED``); reactions to
the other end's state are a pure function returning the actions a driver must perform and the
state to publish next. Drivers do the I/O (XenStore writes, ring mapping); the machine only
decides. Reconnection is first-class: a backend that comes back (Closed → InitWait, or a new
one in InitWait) makes a connected frontend tear down its rings, keep its in-flight requests
and connect again — the path a restarted driver domain takes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def of(cls, value: object) -> XenbusState:
        """A ``state`` node's value as read (bytes, or None or an error where it could not
        be): Unknown for anything but a known state's number, as a peer may write garbage."""
        try:
            return cls(int(value))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return cls.Unknown


def refused_handshake_delay(refusals: int) -> float:
    """Seconds a frontend waits before its next handshake after the ``refusals``-th in a row
    that the backend closed on, after its InitWait: the first at once, then 20 ms doubling to
    1 s (a backend that refuses every time gets a try a second)."""
    return 0.0 if refusals <= 1 else min(1.0, 0.01 * 2 ** (refusals - 1))


class Role(enum.Enum):
    BACKEND = "backend"
    FRONTEND = "frontend"


class Action(enum.Enum):
    PUBLISH_FEATURES = "publish_features"  # backend: write feature-* and limits
    CONNECT = "connect"                    # backend: read ring-ref/event-channel and map
                                           # frontend: allocate rings, grant, write refs
    START = "start"                        # frontend: start (or replay) I/O
    DISCONNECT = "disconnect"              # unmap rings, close channels (keep requests)
    REMOVE = "remove"                      # the device is gone (online=0)


S = XenbusState
ALLOWED: dict[Role, dict[XenbusState, frozenset[XenbusState]]] = {
    Role.BACKEND: {
        S.Unknown: frozenset({S.Initialising, S.InitWait}),
        S.Initialising: frozenset({S.InitWait, S.Closing, S.Closed}),
        S.InitWait: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Closing, S.Closed, S.Reconfiguring}),
        S.Reconfiguring: frozenset({S.Reconfigured, S.Closing}),
        S.Reconfigured: frozenset({S.Connected, S.Closing}),
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.Initialising, S.InitWait}),
    },
    Role.FRONTEND: {
        S.Unknown: frozenset({S.Initialising}),
        S.Initialising: frozenset({S.Initialised, S.Connected, S.Closing, S.Closed}),
        S.Initialised: frozenset({S.Connected, S.Initialising, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Initialising, S.Closing, S.Closed}),
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.Initialising}),
    },
}


class IllegalTransition(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Step:
    actions: tuple[Action, ...]
    states: tuple[XenbusState, ...]  # own states to publish, in order


@dataclass
class XenbusMachine:
    role: Role
    state: XenbusState = XenbusState.Unknown
    online: bool = True
    history: list[XenbusState] = field(default_factory=list)
    connections: int = 0

    def move(self, new: XenbusState) -> None:
        if new == self.state:
            return
        if new not in ALLOWED[self.role].get(self.state, frozenset()):
            raise IllegalTransition(f"{self.role.value}: {self.state.name} -> {new.name}")
        self.history.append(self.state)
        self.state = new

    def apply(self, step: Step) -> Step:
        for new in step.states:
            self.move(new)
        if Action.CONNECT in step.actions:
            self.connections += 1
        return step

    def start(self) -> Step:
        """The device appears: backends publish features and wait; frontends initialise."""
        if self.role is Role.BACKEND:
            return self.apply(Step((Action.PUBLISH_FEATURES,), (S.Initialising, S.InitWait)))
        return self.apply(Step((), (S.Initialising,)))

    def close(self) -> Step:
        """Local shutdown request (unplug, driver stop)."""
        if self.state in (S.Closing, S.Closed, S.Unknown):
            return Step((), ())
        return self.apply(Step((Action.DISCONNECT,), (S.Closing,)))

    def on_peer(self, peer: XenbusState) -> Step:
        """React to the other end's state node; returns what to do and publish."""
        if self.role is Role.BACKEND:
            return self.apply(self._backend(peer))
        return self.apply(self._frontend(peer))

    def _backend(self, fe: XenbusState) -> Step:
        own = self.state
        if fe in (S.Initialised, S.Connected) and own in (S.InitWait, S.Initialising):
            first = (S.InitWait,) if own == S.Initialising else ()
            return Step((Action.CONNECT,), first + (S.Connected,))
        if fe == S.Initialising and own == S.Closed and self.online:
            return Step((Action.PUBLISH_FEATURES,), (S.InitWait,))  # the frontend reconnects
        if fe == S.Initialising and own == S.Connected:
            # The frontend started over (guest reboot, new frontend): drop the old rings.
            return Step((Action.DISCONNECT, Action.PUBLISH_FEATURES),
                        (S.Closing, S.Closed, S.InitWait) if self.online else (S.Closing, S.Closed))
        if fe == S.Closing and own not in (S.Closing, S.Closed):
            return Step((Action.DISCONNECT,), (S.Closing,))
        if fe in (S.Closed, S.Unknown):
            actions: tuple[Action, ...] = ()
            states: tuple[XenbusState, ...] = ()
            if own not in (S.Closing, S.Closed):
                actions, states = (Action.DISCONNECT,), (S.Closing,)
            if own != S.Closed:
                states += (S.Closed,)
            if not self.online or fe == S.Unknown:
                actions += (Action.REMOVE,)
            return Step(actions, states)
        return Step((), ())

    def _frontend(self, be: XenbusState) -> Step:
        own = self.state
        if be == S.InitWait:
            if own == S.Initialising:
                return Step((Action.CONNECT,), (S.Initialised,))
            if own == S.Connected:
                # A backend that starts over (a restarted driver domain): drop the old rings,
                # keep the requests, connect again.
                return Step((Action.DISCONNECT, Action.CONNECT), (S.Initialising, S.Initialised))
            if own == S.Closed and self.online:
                return Step((Action.CONNECT,), (S.Initialising, S.Initialised))
        if be == S.Connected and own == S.Initialised:
            return Step((Action.START,), (S.Connected,))
        if be == S.Initialising and own == S.Connected:
            return Step((Action.DISCONNECT,), (S.Initialising,))
        if be == S.Closing and own not in (S.Closing, S.Closed):
            return Step((Action.DISCONNECT,), (S.Closing, S.Closed))
        if be == S.Closing and own == S.Closing:
            return Step((), (S.Closed,))
        if be in (S.Closed, S.Unknown) and own not in (S.Closed,):
            actions = () if own == S.Closing else (Action.DISCONNECT,)
            states = (S.Closed,) if own == S.Closing else (S.Closing, S.Closed)
            if own in (S.Unknown, S.Initialising):
                states = (S.Closed,) if own == S.Initialising else ()
            return Step(actions, states)
        if be == S.Closed and own == S.Closed and self.online:
            return Step((), (S.Initialising,))  # ready to connect to the next backend
        return Step((), ())
