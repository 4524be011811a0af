"""Hypothesis: the C ring against a pure-Python model of io/ring.h, including event
indices, notification decisions, wrap-around and a hostile producer."""
from __future__ import annotations

import mmap
import struct

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ringfence.hypervisor.io.ring import BackRing, FrontRing, RingOverflow

M = 2**32
REQ, RSP = 12, 4  # netif tx geometry: 256 slots


class Model:
    """io/ring.h written out in Python integers."""

    def __init__(self, size, start):
        self.size = size
        self.req_prod = self.rsp_prod = start
        self.req_event = self.rsp_event = (start + 1) % M
        self.req_prod_pvt = self.rsp_cons = start
        self.rsp_prod_pvt = self.req_cons = start
        self.slots = {}

    @staticmethod
    def notify(new, old, event):
        return (new - event) % M < (new - old) % M


class RingMachine(RuleBasedStateMachine):
    @initialize(start=st.one_of(st.just(0), st.integers(M - 600, M - 1), st.integers(0, M - 1)))
    def setup(self, start):
        self.area = mmap.mmap(-1, 4096)
        self.front = FrontRing(self.area, REQ, RSP, start=start)
        self.back = BackRing(self.area, REQ, RSP, start=start)
        self.m = Model(self.front.size, start)
        self.counter = 0
        self.broken = False

    def _item(self, size):
        self.counter += 1
        return struct.pack("<I", self.counter).ljust(size, b"\xa5")

    @precondition(lambda self: not self.broken)
    @rule(n=st.integers(0, 300))
    def front_put(self, n):
        reqs = [self._item(REQ) for _ in range(n)]
        free = self.m.size - (self.m.req_prod_pvt - self.m.rsp_cons) % M
        put = self.front.put_requests(reqs)
        assert put == min(n, free)
        for i in range(put):
            self.m.slots[(self.m.req_prod_pvt + i) % M] = reqs[i]
        self.m.req_prod_pvt = (self.m.req_prod_pvt + put) % M

    @precondition(lambda self: not self.broken)
    @rule()
    def front_push(self):
        old, new = self.m.req_prod, self.m.req_prod_pvt
        self.m.req_prod = new
        assert self.front.push_requests() == Model.notify(new, old, self.m.req_event)

    @precondition(lambda self: not self.broken)
    @rule(limit=st.integers(1, 300))
    def back_take(self, limit):
        m = self.m
        got = self.back.take_requests(limit)
        avail = (m.req_prod - m.req_cons) % M
        room = m.size - (m.req_cons - m.rsp_prod_pvt) % M
        n = min(avail, room, limit, m.size)
        assert got == [m.slots[(m.req_cons + i) % M] for i in range(n)]
        m.req_cons = (m.req_cons + n) % M

    @precondition(lambda self: not self.broken)
    @rule(n=st.integers(0, 300))
    def back_put(self, n):
        m = self.m
        rsps = [self._item(RSP) for _ in range(n)]
        put = self.back.put_responses(rsps)
        assert put == min(n, (m.req_cons - m.rsp_prod_pvt) % M, m.size)
        for i in range(put):
            m.slots[(m.rsp_prod_pvt + i) % M] = rsps[i]
        m.rsp_prod_pvt = (m.rsp_prod_pvt + put) % M

    @precondition(lambda self: not self.broken)
    @rule()
    def back_push(self):
        old, new = self.m.rsp_prod, self.m.rsp_prod_pvt
        self.m.rsp_prod = new
        assert self.back.push_responses() == Model.notify(new, old, self.m.rsp_event)

    @precondition(lambda self: not self.broken)
    @rule()
    def front_take(self):
        m = self.m
        got = self.front.take_responses()
        n = (m.rsp_prod - m.rsp_cons) % M
        assert got == [m.slots[(m.rsp_cons + i) % M][:RSP] for i in range(n)]
        m.rsp_cons = (m.rsp_cons + n) % M

    @precondition(lambda self: not self.broken)
    @rule()
    def back_final_check(self):
        m = self.m
        pending = min((m.req_prod - m.req_cons) % M, m.size - (m.req_cons - m.rsp_prod_pvt) % M)
        result = self.back.final_check_for_requests()
        if not pending:
            m.req_event = (m.req_cons + 1) % M
        assert result == bool(pending)

    @precondition(lambda self: not self.broken)
    @rule()
    def front_final_check(self):
        m = self.m
        pending = (m.rsp_prod - m.rsp_cons) % M
        result = self.front.final_check_for_responses()
        if not pending:
            m.rsp_event = (m.rsp_cons + 1) % M
        assert result == bool(pending)

    @precondition(lambda self: not self.broken)
    @rule(prod=st.integers(0, M - 1))
    def hostile_req_prod(self, prod):
        """A hostile frontend writes any req_prod: the backend must refuse or stay in bounds."""
        m = self.m
        self.front.sring.req_prod = prod
        if (prod - m.rsp_prod_pvt) % M > m.size:
            try:
                self.back.take_requests()
            except RingOverflow:
                self.broken = True  # a real backend disconnects here
                return
            raise AssertionError("overflow not detected")
        m.req_prod = prod
        # slots it claims but never wrote hold whatever was there: copy, never crash
        n = min((prod - m.req_cons) % M, m.size - (m.req_cons - m.rsp_prod_pvt) % M)
        got = self.back.take_requests()
        assert len(got) == n and all(len(g) == REQ for g in got)
        self.broken = True  # the model no longer knows the contents; stop here

    @rule()
    def statistics_are_consistent(self):
        stats = self.back.statistics()
        assert stats.slots == self.m.size and stats.in_flight <= stats.slots

    @invariant()
    def header_matches(self):
        if getattr(self, "broken", True):
            return
        req_prod, req_event, rsp_prod, rsp_event = struct.unpack_from("<4I", self.area, 0)
        m = self.m
        assert (req_prod, req_event, rsp_prod, rsp_event) == (
            m.req_prod, m.req_event, m.rsp_prod, m.rsp_event)


TestRingModel = RingMachine.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
