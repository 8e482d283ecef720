"""The slice map: which node runs which slice of which queue (docs/cluster.md §1).

``var/cluster/slices.yaml`` looks like this::

    epoch: 7
    queues:
      in:  {count: 2, nodes: {h1: [0], h2: [1]}}
      out: {count: 4, nodes: {h1: [0, 1], h2: [2, 3]}}
      ...                                  # every runner queue must be listed
    nodes:
      h1: {backup: h2, fenced: false}
      h2: {backup: h1, fenced: false}

Per queue, every slice ``0..count-1`` belongs to exactly one node; owners are known nodes; a fenced
node owns nothing; the epoch only grows.

**Epoch files.**  The map of epoch N is the file ``var/cluster/slices.d/<N, 10 digits>.yaml``, made
complete under a temp name and then *created* with ``link()``, which fails with EEXIST when that
name exists: of two writers of epoch N exactly one wins, whatever their locks say (a writer frozen
between reading epoch N-1 and writing N, whose lock claim a takeover broke meanwhile, finds N taken
and writes nothing).  The highest epoch file is the map in force; files are immutable; old ones are
pruned.  ``slices.yaml`` beside it is the copy for people and scripts, rewritten after each change;
a hand edit of it that is valid and raises the epoch is published as the next epoch file by the
next process that looks (:class:`MapWatcher`), and an invalid one is refused, loudly.  Every change
goes through :func:`update_map` (lock, reload, change, validate, publish epoch + 1).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailq.cluster.layout import rebalance_owners, spread  # noqa: F401 - part of this module's interface
from mailq.config import RUNNER_QUEUES, Settings
from mailq.errors import InvalidInput, MailqError, NotFound, TemporaryFailure
from mailq.fsutil import TEMPORARY_ERRNOS, UMASK, atomic_write, fsync_dir, make_dirs
from mailq.locks import named_lock


class SliceMapError(InvalidInput):
    """A slice map that cannot be used; ``problems`` lists every reason, one per line."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where, self.problems = where, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: invalid slice map, refused (the previous map stays in force):\n{lines}\n"
                         f"Fix it with `mailqctl slices edit` or `mailqctl slices check` to see the problems again.")


@dataclass
class NodeEntry:
    backup: str | None = None
    fenced: bool = False


@dataclass
class SliceMap:
    epoch: int = 0
    #: queue -> the owner node of each slice (index = slice number)
    queues: dict[str, list[str]] = field(default_factory=dict)
    nodes: dict[str, NodeEntry] = field(default_factory=dict)

    def count(self, queue: str) -> int:
        return len(self.queues.get(queue, ()))

    def owner_of(self, queue: str, slice: int) -> str | None:
        owners = self.queues.get(queue, [])
        return owners[slice] if 0 <= slice < len(owners) else None

    def slices_for(self, node: str) -> list[tuple[str, int, int]]:
        """(queue, slice, count) of every slice *node* runs; nothing for a fenced node."""
        entry = self.nodes.get(node)
        if entry is None or entry.fenced:
            return []
        return [(q, s, len(owners)) for q, owners in self.queues.items()
                for s, owner in enumerate(owners) if owner == node]

    def live_nodes(self) -> list[str]:
        return sorted(n for n, e in self.nodes.items() if not e.fenced)

    def copy(self) -> SliceMap:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        queues: dict[str, Any] = {}
        for q, owners in self.queues.items():
            per_node: dict[str, list[int]] = {}
            for s, owner in enumerate(owners):
                per_node.setdefault(owner, []).append(s)
            queues[q] = {"count": len(owners), "nodes": per_node}
        return {"epoch": self.epoch, "queues": queues,
                "nodes": {n: {"backup": e.backup, "fenced": e.fenced} for n, e in sorted(self.nodes.items())}}

    def dump(self) -> str:
        import yaml

        head = ("# mailq slice map (docs/cluster.md §1).  Change it with `mailqctl slices ...`; a hand edit must keep\n"
                "# every slice owned by exactly one known, unfenced node and raise the epoch.\n")
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# -- parsing and validation ------------------------------------------------------------------------

def _loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def parse_map(text: str, where: str = "<slice map>") -> SliceMap:
    """Parse and validate; raise SliceMapError listing every problem."""
    import yaml

    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SliceMapError(where, [f"not valid YAML{line}: {getattr(exc, 'problem', None) or exc}"])
    if not isinstance(data, dict):
        raise SliceMapError(where, ["expected a mapping with keys epoch, queues, nodes"])
    problems: list[str] = []
    unknown = set(data) - {"epoch", "queues", "nodes"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(map(str, unknown))}; valid: epoch, queues, nodes")
    epoch = data.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        problems.append(f"epoch must be a whole number >= 0, got {epoch!r}")
        epoch = 0
    smap = SliceMap(epoch=epoch)
    nodes = data.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        problems.append("nodes: expected a mapping of node name -> {backup: NODE, fenced: BOOL}")
        nodes = {}
    for name, entry in nodes.items():
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"backup", "fenced"}:
            problems.append(f"nodes.{name}: expected {{backup: NODE or null, fenced: true|false}}, got {entry!r}")
            continue
        backup, fenced = entry.get("backup"), entry.get("fenced", False)
        if not isinstance(fenced, bool):
            problems.append(f"nodes.{name}.fenced: expected true or false, got {fenced!r}")
            fenced = False
        if backup is not None and not isinstance(backup, str):
            problems.append(f"nodes.{name}.backup: expected a node name, got {backup!r}")
            backup = None
        smap.nodes[str(name)] = NodeEntry(backup=backup, fenced=fenced)
    queues = data.get("queues")
    if not isinstance(queues, dict):
        problems.append("queues: expected a mapping of queue -> {count: N, nodes: {NODE: [slices]}}")
        queues = {}
    for queue, spec in queues.items():
        owners = _parse_queue(str(queue), spec, problems)
        if owners is not None:
            smap.queues[str(queue)] = owners
    problems += validate(smap, skip_queues=set(map(str, queues)) - set(smap.queues))
    if problems:
        raise SliceMapError(where, problems)
    return smap


def _parse_queue(queue: str, spec: Any, problems: list[str]) -> list[str] | None:
    if not isinstance(spec, dict) or set(spec) != {"count", "nodes"}:
        problems.append(f"queues.{queue}: expected {{count: N, nodes: {{NODE: [slice, ...]}}}}, got {spec!r}")
        return None
    count, per_node = spec["count"], spec["nodes"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problems.append(f"queues.{queue}.count must be a whole number >= 1, got {count!r}")
        return None
    if not isinstance(per_node, dict):
        problems.append(f"queues.{queue}.nodes: expected a mapping NODE -> [slice, ...]")
        return None
    seen: dict[int, list[str]] = {}
    for node, slices in per_node.items():
        if isinstance(slices, int) and not isinstance(slices, bool):
            slices = [slices]
        if not isinstance(slices, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                   for s in slices):
            problems.append(f"queues.{queue}.nodes.{node}: expected a list of slice numbers, got {slices!r}")
            continue
        for s in slices:
            if not 0 <= s < count:
                problems.append(f"queues.{queue}: slice {s} of node {node} is out of range 0..{count - 1}")
            else:
                seen.setdefault(s, []).append(str(node))
    ok = True
    for s in range(count):
        owners = seen.get(s, [])
        if not owners:
            problems.append(f"queues.{queue}: gap: slice {s} of {count} has no owner")
            ok = False
        elif len(owners) > 1:
            problems.append(f"queues.{queue}: overlap: slice {s} of {count} is owned by {', '.join(owners)}")
            ok = False
    return [seen[s][0] for s in range(count)] if ok else None


def validate(smap: SliceMap, skip_queues: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Problems of an in-memory map (empty list: valid)."""
    problems = []
    for queue in RUNNER_QUEUES:
        if queue not in smap.queues and queue not in skip_queues:
            problems.append(f"queues.{queue}: missing (every runner queue needs slices, or its mail waits forever)")
    for queue, owners in smap.queues.items():
        if queue not in RUNNER_QUEUES:
            problems.append(f"queues.{queue}: not a runner queue; valid: {', '.join(RUNNER_QUEUES)}")
        if not owners:
            problems.append(f"queues.{queue}: count must be >= 1")
        for s, owner in enumerate(owners):
            entry = smap.nodes.get(owner)
            if entry is None:
                problems.append(f"queues.{queue}: slice {s} is owned by unknown node {owner!r} "
                                f"(add it under nodes: or assign the slice to a known node)")
            elif entry.fenced:
                problems.append(f"queues.{queue}: slice {s} is owned by fenced node {owner!r} "
                                f"(run `mailqctl cluster unfence {owner}` first if it is healthy again)")
    for name, entry in smap.nodes.items():
        if entry.backup is not None and entry.backup not in smap.nodes:
            problems.append(f"nodes.{name}.backup: unknown node {entry.backup!r}")
        if entry.backup == name:
            problems.append(f"nodes.{name}.backup: a node cannot be its own backup")
    return problems


def load_map(path: Path) -> SliceMap | None:
    """The map at *path*, None when the file does not exist; SliceMapError when it is invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise SliceMapError(str(path), ["not UTF-8 text"])
    return parse_map(text, str(path))


def write_map(settings: Settings, smap: SliceMap) -> None:
    """Validate and publish *smap* as its epoch; SliceMapError when another writer has that epoch (or a later one)."""
    problems = validate(smap)
    if problems:
        raise SliceMapError(str(settings.slice_map_path), problems)
    if not publish(settings, smap):
        raise SliceMapError(str(epoch_path(settings, smap.epoch)), [
            f"epoch {smap.epoch} was written by another writer meanwhile (its file exists); nothing written: "
            f"look at `mailqctl slices show` and run the command again"])


def maps_dir(settings: Settings) -> Path:
    """The epoch files: ``var/cluster/slices.d/<epoch>.yaml``, the highest is the map in force."""
    return settings.cluster_dir / "slices.d"


#: Epoch files kept after a change (older ones are pruned): enough for a reader that listed the folder a
#: moment ago to still find the file it chose, and for an operator to look back a little.
KEEP_EPOCHS = 20
_EPOCH_NAME = re.compile(r"^(\d{10})\.yaml$")


def epoch_path(settings: Settings, epoch: int) -> Path:
    return maps_dir(settings) / f"{epoch:010d}.yaml"


def epochs_on_disk(settings: Settings) -> list[int]:
    """Every epoch that has a file, lowest first."""
    try:
        names = os.listdir(maps_dir(settings))
    except FileNotFoundError:
        return []
    return sorted(int(m[1]) for m in map(_EPOCH_NAME.match, names) if m)


def latest_map(settings: Settings, damaged: list[str] | None = None) -> SliceMap | None:
    """The map in force: the highest valid epoch file (None when there is none yet).

    mailq only publishes valid maps, so an invalid epoch file is damage (a disk, a hand): it is
    skipped, never taken for "no map" (which would make every node run every slice), and described
    in *damaged*.
    """
    found = _latest_with_text(settings, damaged)
    return found[0] if found is not None else None


def _latest_with_text(settings: Settings, damaged: list[str] | None) -> tuple[SliceMap, str] | None:
    """:func:`latest_map` and the text of its file (so a reader can tell the copy by its bytes)."""
    for _ in range(3):
        found = epochs_on_disk(settings)
        if not found:
            return None
        vanished = False
        for epoch in reversed(found):
            path = epoch_path(settings, epoch)
            try:
                text = path.read_text(encoding="utf-8")
                smap = parse_map(text, str(path))
            except FileNotFoundError:
                smap = None
            except UnicodeDecodeError:
                if damaged is not None:
                    damaged.append(f"{path} is damaged, skipped (not UTF-8 text); remove it once the "
                                   f"map in force is right (`mailqctl slices show`)")
                continue
            except SliceMapError as exc:
                if damaged is not None:
                    damaged.append(f"{path} is damaged, skipped ({'; '.join(exc.problems)}); remove it once the "
                                   f"map in force is right (`mailqctl slices show`)")
                continue
            except OSError:      # ESTALE on NFS: pruned by another host meanwhile
                smap = None
            if smap is None:
                vanished = True
                break
            return smap, text
        if not vanished:
            return None
    raise SliceMapError(str(maps_dir(settings)), ["the newest epoch file keeps vanishing; is something pruning it?"])


def publish(settings: Settings, smap: SliceMap) -> bool:
    """Create the epoch file of *smap* (exclusive); False when that epoch, or a higher one, exists.

    The file is complete before it has its name (temp, fsync, ``link``), so a reader never sees a
    partial map.  On NFS a ``link`` whose reply was lost is retried by the client and then fails
    with EEXIST although it happened: the name then points at our own inode, which is checked.
    """
    folder = maps_dir(settings)
    make_dirs(folder)
    target = epoch_path(settings, smap.epoch)
    tmp = folder / f".{smap.epoch}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    data = smap.dump().encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
        try:
            if UMASK & 0o664:
                os.fchmod(fd, 0o664)    # every node's user reads it, whatever this one's umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            mine = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)
        except FileExistsError:
            try:
                if os.stat(target).st_ino != mine:
                    return False
            except FileNotFoundError:
                return False
    except OSError as exc:
        if exc.errno in TEMPORARY_ERRNOS:
            raise TemporaryFailure(f"cannot write {target}: {exc.strerror} (free space or fix the filesystem, "
                                   f"then retry)") from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(folder)
    if any(e > smap.epoch for e in epochs_on_disk(settings)):
        # An old epoch created again after it was pruned (a writer frozen for KEEP_EPOCHS changes):
        # never in force; take it back and report the loss.
        with contextlib.suppress(OSError):
            os.unlink(target)
        return False
    _after_publish(settings, smap, data)
    return True


def _after_publish(settings: Settings, smap: SliceMap, data: bytes) -> None:
    """The copy for people (slices.yaml, the previous one kept as .last) and pruning; both best effort."""
    try:
        atomic_write(settings.slice_map_path, data, keep_last=True, mode=0o664)
    except (OSError, MailqError) as exc:
        logging.getLogger("mailq.cluster").warning("epoch %d is in force, but its copy %s could not be written: %s",
                                                   smap.epoch, settings.slice_map_path, exc)
    for old in epochs_on_disk(settings)[:-KEEP_EPOCHS]:
        with contextlib.suppress(OSError):
            os.unlink(epoch_path(settings, old))


def slices_lock(settings: Settings, timeout: float = 30.0) -> Any:
    """The one lock every writer of the slice map takes (var/locks/slices.lock)."""
    return named_lock(settings, "slices", timeout=timeout)


@dataclass
class InForce:
    """The map the cluster follows now, where it came from, and what is wrong with the file."""

    smap: SliceMap | None
    #: "file" (slices.yaml is its copy), "epoch file" (slices.yaml is not: refused or missing) or "none"
    source: str
    #: why the file on disk is not the map in force ("" when it is, or there is no map at all)
    problem: str


def map_in_force(settings: Settings) -> InForce:
    """The map a master starting now would run: the highest epoch file, once a valid hand edit of
    ``slices.yaml`` that raises the epoch is published (the rule of :class:`MapWatcher`).

    ``slices show``, ``cluster status`` and every change (:func:`current_for_update`) start from
    this, so a refused hand edit is never shown as in force nor used as the base of a change.
    """
    watcher = MapWatcher(settings, _QUIET, hand_edits=True)
    smap = watcher.current()
    source = "none"
    if smap is not None:
        source = "file" if watcher.file_is_copy else "epoch file"
    return InForce(smap, source, watcher.problem)


def current_for_update(settings: Settings) -> SliceMap:
    """The map a change starts from: the map in force (a refused hand edit is not; it is replaced)."""
    smap = map_in_force(settings).smap
    if smap is None:
        raise NotFound(f"{settings.slice_map_path}: no slice map yet; create one with "
                       f"`mailqctl slices init --nodes NODE1,NODE2,...`")
    return smap


def update_map(settings: Settings, change: Callable[[SliceMap], SliceMap | None]) -> tuple[SliceMap, SliceMap]:
    """Lock, reload, apply *change* to a copy, validate, bump the epoch, write; return (old, new).

    *change* may edit the copy in place or return a new map; it may raise InvalidInput to refuse.
    The new epoch is one past the highest epoch seen (epoch files and slices.yaml), so it only grows.
    The change starts from the map in force, so a refused hand edit in the file is replaced (it is
    kept as ``slices.yaml.last``).  SliceMapError when the new epoch was written by someone else
    meanwhile (nothing is written then).
    """
    with slices_lock(settings):
        seen = disk_epoch(settings)
        old = current_for_update(settings)
        work = old.copy()
        result = change(work)
        new = result if isinstance(result, SliceMap) else work
        if new.to_dict() | {"epoch": 0} == old.to_dict() | {"epoch": 0}:
            return old, old     # nothing changed: keep the epoch, so runners need not react
        new.epoch = max(old.epoch, seen) + 1
        # Epoch new.epoch is taken only when someone wrote without the lock: a hand edit published
        # meanwhile, or a takeover that broke our claim because our node looked dead.  Then this
        # change is stale: give up (never retry: the lock we think we hold may be gone).
        write_map(settings, new)
        return old, new


def disk_epoch(settings: Settings) -> int:
    """Highest epoch of an epoch file or of slices.yaml, even an invalid hand edit's (epochs never go back)."""
    found = epochs_on_disk(settings)
    best = found[-1] if found else 0
    for path in (settings.slice_map_path,):
        try:
            match = re.search(r"^epoch:\s*(\d+)", path.read_text(encoding="utf-8", errors="replace"), re.M)
        except OSError:
            continue
        if match:
            best = max(best, int(match.group(1)))
    return best


def create_map(settings: Settings, smap: SliceMap) -> SliceMap:
    """Install a first map (``slices init``); refuses when one exists."""
    with slices_lock(settings):
        if settings.slice_map_path.exists() or epochs_on_disk(settings):
            raise InvalidInput(f"{settings.slice_map_path} exists already; change it with `mailqctl slices assign`, "
                               f"`rebalance` or `edit` (or remove the file first if you really mean to start over)")
        smap.epoch = disk_epoch(settings) + 1
        write_map(settings, smap)
        return smap


#: Loggers for looks that report problems themselves (status, show): the watcher must not log them too.
_QUIET = logging.getLogger("mailq.cluster.quiet")
_QUIET.disabled = True


# -- watching the file ------------------------------------------------------------------------------

#: What a watcher's stored signature is while the look it triggered runs (equal to no ``stat``).
_LOOKING = ("looking",)


class MapWatcher:
    """The map in force for a long-running process: the highest epoch file, re-read only on a change.

    A look costs one ``stat`` of ``slices.d`` (a new epoch file changes the folder's mtime).  With
    *hand_edits* (masters and the CLI; a runner's guard passes False, but looks too while there is
    no epoch file at all) it also stats ``slices.yaml``: a hand edit there that is valid and raises
    the epoch is published as the next epoch file; an invalid one, one that does not raise the
    epoch, or a missing file is refused: the map in force stays, ``problem`` says why and is logged
    once per change.  Epochs are written into claim names, so two different maps never share one.
    """

    def __init__(self, settings: Settings, log: logging.Logger | None = None, *, hand_edits: bool = True) -> None:
        self.settings, self.log = settings, log or logging.getLogger("mailq.cluster")
        self.path = settings.slice_map_path
        self.dir = maps_dir(settings)
        self.hand_edits = hand_edits
        self.smap: SliceMap | None = None
        self.problem: str = ""
        #: damaged epoch files (skipped): a problem until removed, whatever slices.yaml says
        self.damaged: str = ""
        self._dir_sig: tuple | None = ()  # () = never looked
        self._file_sig: tuple | None = ()
        #: the text of the map in force's epoch file, and whether slices.yaml is its copy
        self._text: str = ""
        self.file_is_copy = False

    @staticmethod
    def _signature(path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> SliceMap | None:
        # A signature is stored only once the look it triggered is over (_LOOKING meanwhile): a
        # lock-free ``unchanged`` that matches it then sees the map that look left in force.
        sig = self._signature(self.dir)
        if sig != self._dir_sig:
            self._dir_sig = _LOOKING
            # A reload that could not read the newest epoch file is tried again at the next look.
            self._dir_sig = sig if self._reload() else ()
        if self.hand_edits or self.smap is None:
            sig = self._signature(self.path)
            if sig != self._file_sig:
                self._file_sig = _LOOKING
                self._look_at_file(sig is None)
                if self._file_sig is _LOOKING:    # not set by the look itself (a publish, a reload)
                    self._file_sig = sig
        return self.smap

    def no_new_epoch(self) -> bool:
        """True when ``slices.d`` has the ``stat`` signature the last :meth:`current` stored: no
        epoch file was written since (a missing folder is looked at without raising).  One system
        call; reads only, so safe from several threads while one of them looks."""
        sig = self._dir_sig
        if sig is None:
            return not os.access(self.dir, os.F_OK)
        return self._signature(self.dir) == sig

    def _reload(self) -> bool:
        """Read the newest epoch file; False when it could not be read (the look is not done)."""
        damaged: list[str] = []
        try:
            found = _latest_with_text(self.settings, damaged)
        except (SliceMapError, OSError) as exc:
            self._refuse(f"cannot read the newest epoch file in {self.dir}: {exc}")
            return False
        self.damaged = "\n".join(damaged)
        if self.damaged:
            self._refuse(self.damaged)
        new = found[0] if found is not None else None
        if new is None or (self.smap is not None and new.epoch <= self.smap.epoch):
            return True
        if self.smap is not None:
            self.log.info("slice map epoch %d now in force (was %d)", new.epoch, self.smap.epoch)
        self.smap, self._text = new, found[1]
        self._file_sig = ()          # is slices.yaml still a hand edit, or the copy of this map?
        return True

    def _look_at_file(self, missing: bool) -> None:
        self.file_is_copy = False
        if missing:
            if self.smap is not None and self.hand_edits:
                self._refuse(f"{self.path} is missing; epoch {self.smap.epoch} stays in force (from "
                             f"{epoch_path(self.settings, self.smap.epoch)}); run `mailqctl slices edit` "
                             f"to write the file again")
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            self._refuse(f"{self.path}: {exc}")
            return
        if self.smap is not None and text == self._text:
            # The copy written with the map in force (the usual case): no YAML to parse.
            self.file_is_copy = True
            self._fixed()
            return
        try:
            edit = parse_map(text, str(self.path))
        except SliceMapError as exc:
            self._refuse(str(exc))
            return
        if self.smap is not None and edit.to_dict() == self.smap.to_dict():
            self.file_is_copy = True
            self._fixed()
            return
        if self.smap is None or edit.epoch > self.smap.epoch:
            if publish(self.settings, edit):
                self.log.warning("hand edit of %s published as slice map epoch %d", self.path, edit.epoch)
                self.smap, self._text, self.file_is_copy = edit, edit.dump(), True
                self._dir_sig = self._signature(self.dir)
                self._file_sig = self._signature(self.path)
                self._fixed()
            else:
                self._reload()
                self._refuse(f"{self.path}: refused: epoch {edit.epoch} was written by another writer meanwhile; "
                             f"redo the edit from `mailqctl slices show` (epoch {self.smap and self.smap.epoch}) "
                             f"with a higher epoch, or use `mailqctl slices edit`")
            return
        try:
            stale = load_map(epoch_path(self.settings, edit.epoch))
        except (SliceMapError, OSError):
            stale = None
        if stale is not None and stale.to_dict() == edit.to_dict():
            # An older epoch's copy, written late by its writer: not an edit; put the current one back.
            with contextlib.suppress(OSError, MailqError):
                atomic_write(self.path, self.smap.dump().encode(), mode=0o664)
            return
        self._refuse(f"{self.path}: refused: the map changed but its epoch {edit.epoch} is not above the "
                     f"map in force ({self.smap.epoch}); set `epoch: {self.smap.epoch + 1}` or use "
                     f"`mailqctl slices edit`")

    def _fixed(self) -> None:
        if self.problem and self.problem != self.damaged:
            assert self.smap is not None
            self.log.warning("slice map problem fixed: epoch %d in force", self.smap.epoch)
        self.problem = self.damaged

    def _refuse(self, message: str) -> None:
        if message != self.problem:
            self.log.error("%s", message)
        self.problem = message


def problem_now(settings: Settings) -> str:
    """What is wrong with the map file right now ("" when valid or absent), for status and check."""
    return map_in_force(settings).problem


def assignments_for(settings: Settings, smap: SliceMap | None, node: str) -> list[tuple[str, int, int]]:
    """(queue, slice, count) the master of *node* runs: from the map, or every slice when there is none."""
    if smap is None:
        return [(q, s, settings.slice_count(q)) for q in RUNNER_QUEUES for s in range(settings.slice_count(q))]
    return smap.slices_for(node)
