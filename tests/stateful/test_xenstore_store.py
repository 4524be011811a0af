"""The XenStore tree as a state machine (ATTACKS X7, X10): random writes, mkdirs, removals,
permission changes, transactions and domain releases by several domains, with quotas hit on
the way; after every step the tree stays whole: every node's parent exists and lists it,
children exist, and each domain's node count is what it really owns."""
from __future__ import annotations

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.store import Caller, Quotas, Store, parent_of

DOMAINS = (0, 3, 5)
NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map(lambda parts: "/t/" + "/".join(parts))


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store(Quotas(nodes=12))
        root = Caller(0)
        self.store.write(root, "/t", b"")
        self.store.set_perms(root, "/t", ((0, "b"),))  # everyone may write under /t
        self.open: dict[int, object] = {}

    def _try(self, action) -> None:
        try:
            action()
        except XenStoreError:
            pass  # refusals (quota, permissions, conflicts) are fine; damage is not

    @rule(domid=st.sampled_from(DOMAINS), path=PATHS, value=st.binary(max_size=8), in_tx=st.booleans())
    def write(self, domid, path, value, in_tx):
        self._try(lambda: self.store.write(Caller(domid), path, value, self.open.get(domid) if in_tx else None))

    @rule(domid=st.sampled_from(DOMAINS), path=PATHS, in_tx=st.booleans())
    def mkdir(self, domid, path, in_tx):
        self._try(lambda: self.store.mkdir(Caller(domid), path, self.open.get(domid) if in_tx else None))

    @rule(domid=st.sampled_from(DOMAINS), path=PATHS, in_tx=st.booleans())
    def rm(self, domid, path, in_tx):
        self._try(lambda: self.store.rm(Caller(domid), path, self.open.get(domid) if in_tx else None))

    @rule(domid=st.sampled_from(DOMAINS), path=PATHS, owner=st.sampled_from(DOMAINS),
          reader=st.sampled_from(DOMAINS))
    def set_perms(self, domid, path, owner, reader):
        self._try(lambda: self.store.set_perms(Caller(domid), path, ((owner, "n"), (reader, "r"))))

    @precondition(lambda self: len(self.open) < len(DOMAINS))
    @rule(domid=st.sampled_from(DOMAINS))
    def start(self, domid):
        if domid not in self.open:
            self._try(lambda: self.open.__setitem__(domid, self.store.start_transaction(Caller(domid))))

    @rule(domid=st.sampled_from(DOMAINS), commit=st.booleans())
    def end(self, domid, commit):
        tx = self.open.pop(domid, None)
        if tx is not None and tx.id in self.store.transactions:
            self._try(lambda: self.store.end_transaction(tx, commit))

    @rule(domid=st.sampled_from(DOMAINS[1:]))
    def release(self, domid):
        self.store.abort_all(domid)
        self.open.pop(domid, None)
        self.store.forget_domain(domid)

    @invariant()
    def tree_is_whole(self):
        nodes = self.store.nodes
        for path, node in nodes.items():
            if path != "/":
                parent = nodes.get(parent_of(path))
                assert parent is not None, f"{path} has no parent"
                assert path.rsplit("/", 1)[1] in parent.children, f"{path} not listed by its parent"
            for child in node.children:
                assert (path.rstrip("/") + "/" + child) in nodes, f"{path} lists missing {child}"

    @invariant()
    def node_counts_are_what_domains_own(self):
        actual = Counter(node.owner for node in self.store.nodes.values())
        for domid in DOMAINS[1:]:  # dom0 has no quota, so no count to keep right
            assert self.store.owned.get(domid, 0) == actual.get(domid, 0), (domid, dict(self.store.owned), dict(actual))


TestTree = TreeMachine.TestCase
TestTree.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_transaction_open_across_a_release_names_no_gone_domain():
    """Found by the machine above: a transaction that read a node a released domain owned
    fails with EAGAIN, so its copy (naming the gone domain) is never committed."""
    store, root = Store(Quotas(nodes=12)), Caller(0)
    store.write(root, "/t", b"")
    store.set_perms(root, "/t", ((0, "b"),))
    store.mkdir(Caller(3), "/t/a")
    tx = store.start_transaction(root)
    store.mkdir(root, "/t/a/a", tx)  # its parent's copy, owned by dom3, goes in the transaction
    store.abort_all(3)
    store.forget_domain(3)
    try:
        store.end_transaction(tx, commit=True)
        raise AssertionError("committed")
    except XenStoreError as exc:
        assert exc.name == "EAGAIN"
    assert not any(domid == 3 for node in store.nodes.values() for domid, _ in node.perms)
    assert store.owned.get(3, 0) == 0
