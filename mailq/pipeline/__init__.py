"""The list pipeline: an ordered list of stage names, one module per stage (docs/pipeline.md).

``run(names, mlist, msg, msgdata, ctx)`` imports ``mailq.pipeline.<name>`` for each name and calls
its ``process(mlist, msg, msgdata, ctx)``.  The order is data (``settings.pipeline.posts`` and
``.owner``), so a site can drop or reorder stages in etc/mailq.yaml.  A stage ends the run by
raising ``Hold``, ``Reject`` or ``Discard`` (``mailq.pipeline.base``); the caller (the ``in``
runner) acts on it.  Returning normally means the message went all the way through; the entries
the stages asked for are written then (``ctx.flush``): the ``archive`` copies
(``ctx.copy_for_archive``, one entry per distinct message) first, the ``out`` entry
(``ctx.send_out``) last.  A write that fails leaves ``ctx.queued`` / ``ctx.unwritten()`` saying
what is done and what is not; the ``in`` runner keeps that in the entry it requeues.
"""
from __future__ import annotations

import importlib
import re
from email.message import Message
from types import ModuleType

from mailq.errors import InvalidInput
from mailq.lists.mlist import MailingList
from mailq.pipeline.base import Context, Discard, Hold, Reject, StageStop

__all__ = ["run", "run_stages", "load_stage", "Context", "Hold", "Reject", "Discard", "StageStop"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_cache: dict[str, ModuleType] = {}


def load_stage(name: str) -> ModuleType:
    """The module for stage *name*; InvalidInput names the stage and where the order is configured."""
    module = _cache.get(name)
    if module is not None:
        return module
    if not _NAME.match(name) or name == "base":
        raise InvalidInput(f"pipeline stage {name!r} is not a valid stage name "
                           f"(fix pipeline.posts / pipeline.owner in etc/mailq.yaml)")
    try:
        module = importlib.import_module(f"mailq.pipeline.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"mailq.pipeline.{name}":
            raise
        raise InvalidInput(f"unknown pipeline stage {name!r}: no module mailq/pipeline/{name}.py "
                           f"(fix pipeline.posts / pipeline.owner in etc/mailq.yaml)") from None
    if not callable(getattr(module, "process", None)):
        raise InvalidInput(f"pipeline stage {name!r} has no process() function")
    _cache[name] = module
    return module


def run(names: list[str], mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    """Run the stages *names* in order on *msg*, then write what they asked for (``ctx.flush``);
    a stage's Hold/Reject/Discard propagates."""
    run_stages(names, mlist, msg, msgdata, ctx)
    ctx.flush()
    msgdata["queued"] = dict(ctx.queued)   # what this post became: {"archive:0": id, "out": id}


def run_stages(names: list[str], mlist: MailingList, msg: Message, msgdata: dict, ctx: Context) -> None:
    """Run the stages *names* in order on *msg* without writing anything yet (``run`` without the
    flush: the ``in`` runner runs a batch of posts up to ``post_number`` this way, numbers them all
    in one lock cycle, then runs the rest with ``run``)."""
    stages = [load_stage(name) for name in names]  # all names checked before any stage acts
    for name, stage in zip(names, stages, strict=True):
        ctx.trail.append(name)
        stage.process(mlist, msg, msgdata, ctx)
