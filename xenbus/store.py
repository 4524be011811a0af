"""The XenStore tree, sans-IO: nodes, permissions, transactions, quotas (docs/misc/xenstore.txt).

Everything here is synchronous and deterministic so that Hypothesis can drive it; the
server (``server.py``) only moves bytes. Every operation takes the caller's :class:`Caller`
(its domid, decided by the transport, never by the request) and an optional transaction, and
returns what it changed so that the server can fire watches.

Transactions keep an overlay of the nodes they touched and the generation at which they
started; committing fails with EAGAIN if any node the transaction read or wrote was changed
(or removed) by someone else since then, as Xen's C daemon does.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

from ringfence.hypervisor.io.xs_wire import ABS_PATH_MAX, REL_PATH_MAX, XenStoreError

PERM_CHARS = "nrwb"
_VALID = re.compile(r"^[A-Za-z0-9\-/_@]*$")
_SPECIAL = ("@introduceDomain", "@releaseDomain")
_HOME = re.compile(r"^/local/domain/[0-9]{1,5}/")
Perms = tuple[tuple[int, str], ...]
Change = tuple[str, bool]  # (path, removed): what watches fire on


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-domain limits, the C xenstored's defaults."""
    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    node_size: int = 2048
    outstanding: int = 20
    permissions: int = 5


@dataclass(frozen=True, slots=True)
class Caller:
    domid: int
    target: int | None = None  # a device model may act for its target domain

    @property
    def privileged(self) -> bool:
        return self.domid == 0


@dataclass(slots=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0][0]

    def size(self) -> int:
        return len(self.value) + sum(len(c) + 1 for c in self.children) + 4 * len(self.perms)


@dataclass(eq=False)
class Transaction:
    id: int
    caller: Caller
    start_gen: int
    overlay: dict[str, Node | None] = field(default_factory=dict)
    # what nodes looked like when the transaction started, saved as others change them
    snapshot: dict[str, Node | None] = field(default_factory=dict)
    accessed: set[str] = field(default_factory=set)
    changes: list[Change] = field(default_factory=list)
    owned_delta: Counter[int] = field(default_factory=Counter)
    conflict: str | None = None  # the node someone else changed, when commit failed
    doomed: bool = False  # it saw a change before it was ours (an adopted one): commit fails


def parse_perms(args: list[bytes]) -> Perms:
    perms = []
    for raw in args:
        text = raw.decode("ascii", "replace")
        if len(text) < 2 or text[0] not in PERM_CHARS or not text[1:].isdigit():
            raise XenStoreError("EINVAL", f"bad permission {text!r}")
        domid = int(text[1:])
        if domid > 0xFFFF:
            raise XenStoreError("EINVAL", "domid out of range")
        perms.append((domid, text[0]))
    if not perms:
        raise XenStoreError("EINVAL", "no permissions")
    return tuple(perms)


def format_perms(perms: Perms) -> bytes:
    return b"".join(f"{p}{d}".encode() + b"\0" for d, p in perms)


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonical(caller: Caller, path: str, *, allow_special: bool = False) -> str:
    """Absolute, validated path (relative paths are under the caller's domain path)."""
    if allow_special and path in _SPECIAL:
        return path
    if not path or not _VALID.match(path) or "//" in path or "@" in path:
        raise XenStoreError("EINVAL", f"bad path {path[:64]!r}")
    if path[0] != "/":
        path = f"{domain_path(caller.domid)}/{path}"
    # As Xen's C daemon (XSA-323): the limit counts what follows /local/domain/N/, so a
    # path is accepted or refused the same whichever way it is spelt.
    home = _HOME.match(path)
    if len(path) - (home.end() if home else 0) > REL_PATH_MAX or len(path) > ABS_PATH_MAX:
        raise XenStoreError("EINVAL", "path too long")
    if len(path) > 1 and path.endswith("/"):
        raise XenStoreError("EINVAL", "trailing slash")
    return path


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def name_of(path: str) -> str:
    return path.rsplit("/", 1)[1]


class Store:
    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.gen = 0
        self.nodes: dict[str, Node] = {}
        self.tombstones: dict[str, int] = {}   # path -> generation of its removal
        self.owned: Counter[int] = Counter()   # nodes owned per domain (quota)
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self.counters: Counter[str] = Counter()
        # When set, every node's new value (None: removed) as it is committed, for a copy
        # of the values kept elsewhere (the C engine that answers dom0's reads).
        self.value_log: list[tuple[str, bytes | None]] | None = None
        for path in ("/", "/local", "/local/domain", "/tool"):
            self.nodes[path] = Node(b"", ((0, "n"),))
        self._relink()

    def _relink(self) -> None:
        for path in list(self.nodes):
            if path != "/":
                parent = self.nodes[parent_of(path)]
                if name_of(path) not in parent.children:
                    parent.children += (name_of(path),)

    # ---- views -----------------------------------------------------------------------
    def _get(self, path: str, tx: Transaction | None) -> Node | None:
        if tx is not None:
            tx.accessed.add(path)
            if path in tx.overlay:
                return tx.overlay[path]
            if path in tx.snapshot:
                return tx.snapshot[path]
        return self.nodes.get(path)

    def _put(self, path: str, node: Node | None, tx: Transaction | None) -> None:
        if tx is not None:
            tx.overlay[path] = node
            tx.accessed.add(path)
            return
        self.gen += 1
        old = self.nodes.get(path)
        for open_tx in self.transactions.values():
            # isolation: an open transaction keeps seeing the node as it was
            if path not in open_tx.overlay and path not in open_tx.snapshot:
                open_tx.snapshot[path] = old
        if self.value_log is not None:
            self.value_log.append((path, None if node is None else node.value))
        if node is None:
            self.nodes.pop(path, None)
            self.tombstones[path] = self.gen
        else:
            node.gen = self.gen
            self.nodes[path] = node
            self.tombstones.pop(path, None)

    @staticmethod
    def can(caller: Caller, node: Node, access: str) -> bool:
        if caller.privileged:
            return True
        ids = {caller.domid} | ({caller.target} if caller.target is not None else set())
        if node.owner in ids:
            return True
        granted = node.perms[0][1]
        for domid, perm in node.perms[1:]:
            if domid in ids:
                granted = perm
                break
        return granted == "b" or granted == access

    def _check(self, caller: Caller, node: Node, access: str) -> None:
        if not self.can(caller, node, access):
            self.counters["eacces"] += 1
            raise XenStoreError("EACCES")

    def _readable(self, caller: Caller, path: str, tx: Transaction | None) -> Node:
        node = self._get(path, tx)
        if node is None:
            raise XenStoreError("ENOENT")
        self._check(caller, node, "r")
        return node

    # ---- operations ------------------------------------------------------------------
    def read(self, caller: Caller, path: str, tx: Transaction | None = None) -> bytes:
        return self._readable(caller, path, tx).value

    def directory(self, caller: Caller, path: str, tx: Transaction | None = None) -> tuple[str, ...]:
        return self._readable(caller, path, tx).children

    def generation(self, caller: Caller, path: str, tx: Transaction | None = None) -> int:
        return self._readable(caller, path, tx).gen

    def get_perms(self, caller: Caller, path: str, tx: Transaction | None = None) -> Perms:
        return self._readable(caller, path, tx).perms

    def write(self, caller: Caller, path: str, value: bytes, tx: Transaction | None = None) -> list[Change]:
        node = self._get(path, tx)
        if node is None:
            return self._create(caller, path, value, tx)
        self._check(caller, node, "w")
        updated = Node(value, node.perms, node.children, node.gen)  # not replace(): hot path
        self._check_size(caller, updated)
        self._put(path, updated, tx)
        return self._changed(tx, [(path, False)])

    def mkdir(self, caller: Caller, path: str, tx: Transaction | None = None) -> list[Change]:
        node = self._get(path, tx)
        if node is not None:
            self._check(caller, node, "w")
            return []
        return self._create(caller, path, b"", tx)

    def _create(self, caller: Caller, path: str, value: bytes, tx: Transaction | None) -> list[Change]:
        if path == "/":
            raise XenStoreError("EINVAL")
        # Walk up to the deepest existing ancestor, which must be writable.
        missing = [path]
        parent = parent_of(path)
        while self._get(parent, tx) is None:
            missing.append(parent)
            parent = parent_of(parent)
        anchor = self._get(parent, tx)
        assert anchor is not None
        self._check(caller, anchor, "w")
        perms = anchor.perms
        if not caller.privileged:
            perms = ((caller.domid, perms[0][1]),) + perms[1:]
            if self._owned(caller.domid, tx) + len(missing) > self.quotas.nodes:
                self.counters["quota_nodes"] += 1
                raise XenStoreError("ENOSPC", "node quota")
        for new in reversed(missing):
            node = Node(value if new == path else b"", perms)
            if new == path:
                self._check_size(caller, node)
            self._put(new, node, tx)
            self._add_child(parent_of(new), name_of(new), tx)
            self._own(perms[0][0], 1, tx)
        # Watches fire for the node written, not for the parents it implied (as Xen's C and
        # OCaml daemons do).
        return self._changed(tx, [(path, False)])

    def _add_child(self, parent: str, name: str, tx: Transaction | None) -> None:
        node = self._get(parent, tx)
        assert node is not None
        if name not in node.children:
            self._put(parent, Node(node.value, node.perms, node.children + (name,), node.gen), tx)

    def rm(self, caller: Caller, path: str, tx: Transaction | None = None) -> list[Change]:
        if path == "/":
            raise XenStoreError("EINVAL", "cannot remove the root")
        node = self._get(path, tx)
        if node is None:
            # Removing what does not exist succeeds if the parent exists (as Xen).
            if self._get(parent_of(path), tx) is None:
                raise XenStoreError("ENOENT")
            return []
        self._check(caller, node, "w")
        parent = self._get(parent_of(path), tx)
        assert parent is not None
        removed = self._subtree(path, tx)
        for sub in removed:
            gone = self._get(sub, tx)
            if gone is not None:
                self._own(gone.owner, -1, tx)
            self._put(sub, None, tx)
        name = name_of(path)
        self._put(parent_of(path), Node(parent.value, parent.perms, tuple(
            c for c in parent.children if c != name), parent.gen), tx)
        return self._changed(tx, [(path, True)])

    def _subtree(self, path: str, tx: Transaction | None) -> list[str]:
        out, stack = [], [path]
        while stack:
            current = stack.pop()
            node = self._get(current, tx)
            if node is None:
                continue
            out.append(current)
            prefix = current if current != "/" else ""
            stack.extend(f"{prefix}/{child}" for child in node.children)
        return out

    def set_perms(self, caller: Caller, path: str, perms: Perms, tx: Transaction | None = None) -> list[Change]:
        node = self._get(path, tx)
        if node is None:
            raise XenStoreError("ENOENT")
        self._check(caller, node, "w")
        if not caller.privileged and len(perms) > self.quotas.permissions:
            raise XenStoreError("ENOSPC", "too many permissions")
        if node.owner != perms[0][0]:
            if not caller.privileged and perms[0][0] != caller.domid:
                raise XenStoreError("EPERM", "only dom0 may give a node away")
            self._own(node.owner, -1, tx)
            self._own(perms[0][0], 1, tx)
        self._put(path, replace(node, perms=perms), tx)
        return self._changed(tx, [(path, False)])

    def _check_size(self, caller: Caller, node: Node) -> None:
        if not caller.privileged and node.size() > self.quotas.node_size:
            self.counters["quota_size"] += 1
            raise XenStoreError("E2BIG", "node too big")

    # ---- ownership quota -------------------------------------------------------------
    def _owned(self, domid: int, tx: Transaction | None) -> int:
        return self.owned[domid] + (tx.owned_delta[domid] if tx else 0)

    def _own(self, domid: int, delta: int, tx: Transaction | None) -> None:
        if tx is not None:
            tx.owned_delta[domid] += delta
        else:
            self.owned[domid] += delta

    def _changed(self, tx: Transaction | None, paths: list[Change]) -> list[Change]:
        if tx is not None:
            tx.changes.extend(paths)
            return []
        return paths

    # ---- transactions ----------------------------------------------------------------
    def start_transaction(self, caller: Caller, tx_id: int | None = None) -> Transaction:
        """A new transaction; ``tx_id`` is for one another part of the daemon started (the
        C engine's ids are 0x80000000 and above, never ours)."""
        if not caller.privileged and sum(
                1 for t in self.transactions.values() if t.caller.domid == caller.domid
        ) >= self.quotas.transactions:
            self.counters["quota_transactions"] += 1
            raise XenStoreError("ENOSPC", "too many transactions")
        if tx_id is None:
            tx_id = self._next_tx
            self._next_tx = self._next_tx % 0x7FFFFFFF + 1
        tx = Transaction(tx_id, caller, self.gen)
        self.transactions[tx.id] = tx
        return tx

    def end_transaction(self, tx: Transaction, commit: bool) -> list[Change]:
        """Commit (or abort); returns the paths changed. EAGAIN if someone else won."""
        self.transactions.pop(tx.id, None)
        self._prune_tombstones()
        if not commit:
            return []
        if tx.doomed:
            self.counters["conflicts"] += 1
            raise XenStoreError("EAGAIN")
        for path in tx.accessed:
            current = self.nodes.get(path)
            changed_at = current.gen if current is not None else self.tombstones.get(path, 0)
            if changed_at > tx.start_gen:
                self.counters["conflicts"] += 1
                tx.conflict = path
                raise XenStoreError("EAGAIN")
        for domid, delta in tx.owned_delta.items():
            if delta > 0 and domid and self.owned[domid] + delta > self.quotas.nodes:
                raise XenStoreError("ENOSPC", "node quota")
        for path, node in tx.overlay.items():
            self._put(path, node, None)
        tx.snapshot.clear()
        for domid, delta in tx.owned_delta.items():
            self.owned[domid] += delta
        self.counters["commits"] += 1
        return list(dict.fromkeys(tx.changes))

    def forget_domain(self, domid: int) -> list[str]:
        """A destroyed domain leaves nothing for the next one given its domid (XSA-322, as
        Xen's remove_domid_from_perm): nodes it owned pass to dom0, its other permission
        entries go. Returns the paths changed."""
        changed = []
        for path, node in self.nodes.items():
            for named, _ in node.perms:  # every node is looked at: no generator per node
                if named == domid:
                    break
            else:
                continue
            owner, mode = node.perms[0]
            perms = ((0 if owner == domid else owner, mode),) + tuple(
                p for p in node.perms[1:] if p[0] != domid)
            if self.transactions:
                # An open transaction keeps its view, and one that read the node fails
                # with EAGAIN: committed, its copy would name the domain that is gone.
                self._put(path, replace(node, perms=perms), None)
            else:
                self.gen += 1
                node.perms, node.gen = perms, self.gen
            changed.append(path)
        self.owned[0] += self.owned.pop(domid, 0)
        return changed

    def abort_all(self, domid: int | None = None) -> None:
        for tx in list(self.transactions.values()):
            if domid is None or tx.caller.domid == domid:
                self.transactions.pop(tx.id)

    def _prune_tombstones(self) -> None:
        oldest = min((t.start_gen for t in self.transactions.values()), default=self.gen)
        if len(self.tombstones) > 1024:
            self.tombstones = {p: g for p, g in self.tombstones.items() if g > oldest}
