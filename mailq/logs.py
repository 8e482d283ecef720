"""Per-node, per-component log files under ``var/log/<node>/``: one line per event.

Lines look like ``2026-11-22 02:05:47,123 h1 out:0/1[4242] INFO delivered 1763777147.1+ab12.. to 3``.
An event whose text has several lines (a traceback) keeps its first line as the event line; every
further line is indented by four spaces, so ``grep -v '^ '`` lists events and nothing in a
traceback can pass for one. A WatchedFileHandler reopens the file when logrotate moves it; SIGHUP
(``mailqctl reopen``) also calls ``reopen_all``.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator

from mailq.config import Settings
from mailq.fsutil import make_dirs, open_shared

class _SafeWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that survives its folder vanishing (var unmounted, log dir removed).

    The stock handler re-opens the file outside its own error handling, so a missing folder would
    raise out of every ``log.info`` and take a runner down with it.  Here the line goes to logging's
    error hook (stderr) and work goes on; the folder is NOT made again, because an empty folder is
    what an unmounted shared ``var/`` looks like, and writing under a mount point fills local disk.
    """

    #: Lines formatted while ``many_lines`` holds them back (None: each line is written at once).
    pending: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.pending is not None:
            try:
                self.pending.append(self.format(record) + self.terminator)
            except Exception:
                self.handleError(record)
            return
        try:
            self.reopenIfNeeded()
        except OSError:
            self.handleError(record)
            return
        logging.FileHandler.emit(self, record)

    def write_pending(self) -> None:
        """Write the lines ``many_lines`` held back: whole lines, up to 64 KiB per write."""
        lines, self.pending = self.pending or [], None
        if not lines:
            return
        self.acquire()
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
            chunk: list[str] = []
            size = 0
            for line in lines:
                chunk.append(line)
                size += len(line)
                if size >= 65536:
                    self.stream.write("".join(chunk))
                    self.stream.flush()
                    chunk, size = [], 0
            if chunk:
                self.stream.write("".join(chunk))
                self.stream.flush()
        except OSError as exc:
            sys.stderr.write(f"mailq: cannot write {len(lines)} line(s) to {self.baseFilename}: {exc}\n")
        finally:
            self.release()

    def _open(self):  # type: ignore[override]
        # A log file of the shared tree gets fsutil's FILE_MODE, whatever the umask.
        fd = open_shared(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


_FORMAT = "%(asctime)s %(node)s %(component)s[%(process)d] %(levelname)s %(message)s"
#: Prefix of every continuation line of a multi-line event.
CONTINUATION = "    "
_handlers: list[_SafeWatchedFileHandler] = []


class _EventFormatter(logging.Formatter):
    """One event per unindented line: continuation lines (tracebacks, multi-line messages) indented."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text and "\r" not in text:
            return text
        lines = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
        return lines[0] + "".join(f"\n{CONTINUATION}{line}" for line in lines[1:])


@contextlib.contextmanager
def many_lines(logger: logging.Logger) -> Iterator[None]:
    """Log many events in one go (the decisions of a batch of bounces): the lines *logger* writes
    to its log files inside the block are written when it ends, in a few writes of whole lines,
    instead of one look for a rotated file, one write and one flush per line.  Several processes
    appending to one file still never split each other's lines."""
    held = [h for h in logger.handlers if isinstance(h, _SafeWatchedFileHandler) and h.pending is None]
    for handler in held:
        handler.pending = []
    try:
        yield
    finally:
        for handler in held:
            handler.write_pending()


def formatter() -> logging.Formatter:
    """The formatter of every mailq log line (files and the ``-v`` / foreground stderr copies)."""
    return _EventFormatter(_FORMAT)


class _Context(logging.Filter):
    def __init__(self, node: str, component: str) -> None:
        super().__init__()
        self.node, self.component = node, component

    def filter(self, record: logging.LogRecord) -> bool:
        record.node, record.component = self.node, self.component
        return True


def get_logger(settings: Settings, component: str, *, filename: str | None = None,
               stderr: bool = False) -> logging.Logger:
    """A logger writing to ``var/log/<node>/<filename or component>.log`` (and stderr if asked).

    *component* names the writer in every line (``out:0/4``, ``master``, ``deliver``).
    """
    # Keyed by the log folder too: one process (a test, the demo) may serve several var/ trees.
    log_key = str(settings.log_dir).replace(".", "_")
    logger = logging.getLogger(f"mailq.{log_key}.{component}")
    if logger.handlers:
        return logger
    logger.setLevel(settings.log.level.upper())
    logger.propagate = False
    log_dir = settings.log_dir
    name = (filename or component.split(":")[0]) + ".log"
    try:
        make_dirs(log_dir)     # fsutil's DIR_MODE, whatever the umask
        watched = _SafeWatchedFileHandler(log_dir / name, encoding="utf-8")
        _handlers.append(watched)
        handler: logging.Handler = watched
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    handler.addFilter(_Context(settings.node.name, component))
    logger.addHandler(handler)
    if stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(formatter())
        err.addFilter(_Context(settings.node.name, component))
        logger.addHandler(err)
    return logger


#: Set by a daemonized master for itself and its runners: the file their stdout/stderr point at
#: (``master.log``), which :func:`reopen_all` opens again so that no process keeps writing to a
#: file logrotate moved away.
STDIO_LOG_ENV = "MAILQ_STDIO_LOG"


def redirect_stdio(path: str) -> None:
    """Point stdout and stderr (fds 1 and 2) at *path*, appending; remembered for reopen_all."""
    os.environ[STDIO_LOG_ENV] = str(path)
    out = open_shared(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)     # FILE_MODE, whatever the umask
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def reopen_all() -> None:
    """Close and reopen every log file, and stdout/stderr when they are a log (after logrotate; SIGHUP)."""
    stdio = os.environ.get(STDIO_LOG_ENV)
    if stdio:
        try:
            redirect_stdio(stdio)
        except OSError:
            pass        # folder gone: keep the old file, as the handlers below do
    for handler in _handlers:
        handler.acquire()
        try:
            if handler.stream:
                handler.stream.close()
            handler.stream = handler._open()
        except OSError:
            # Folder gone (var unmounted): never made again here; emit() retries the open on each
            # line and reports to stderr until the folder is back.
            pass
        finally:
            handler.release()
