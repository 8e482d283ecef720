"""Runners: one module per queue, all built on ``mailq.runners.base.Runner`` (docs/design.md §1).

``REGISTRY`` names every runner the master may start, as ``"module:Class"`` so that a runner
process imports only its own module.  Queues without an entry here have no runner yet: entries
written there wait until one exists.  A new runner is one module (a ``Runner`` subclass with
``queue`` and ``process``) and one line here; docs/internals.md "Runners" says the rest.
A runner that serves no queue subclasses ``mailq.runners.process.RunnerProcess`` with
``unsliced = True`` (the LMTP listener): the master starts one per node, never sliced.
"""
from __future__ import annotations

import importlib

#: runner name -> "module:Class".  A sliced runner's name is also the queue it serves.
REGISTRY: dict[str, str] = {
    "in": "mailq.runners.incoming:IncomingRunner",
    "out": "mailq.runners.outgoing:OutgoingRunner",
    "virgin": "mailq.runners.virgin:VirginRunner",
    "retry": "mailq.runners.retry:RetryRunner",
    "archive": "mailq.runners.archive:ArchiveRunner",
    "lmtp": "mailq.runners.lmtp:LMTPRunner",
    "bounces": "mailq.runners.bounces:BouncesRunner",
    "commands": "mailq.runners.commands:CommandsRunner",
}


def load_runner(name: str) -> type:
    """The runner class registered as *name*; KeyError naming the valid names if there is none."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise KeyError(f"no runner named {name!r}; valid names: {', '.join(sorted(REGISTRY))}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
