"""``mailqctl metrics``: the Prometheus text format for this node and the shared tree.

Series and alerts: docs/operations.md "Metrics"; the series come from :mod:`mailq.metrics`.
"""
from __future__ import annotations

import sys

import click

from mailq.cli.common import get_settings, handle_errors


@click.command()
@click.option("--textfile", "folder", type=click.Path(file_okay=False, writable=True),
              help="Write DIR/mailq_<node>.prom atomically for node_exporter's textfile collector "
                   "instead of printing.")
@click.option("--no-queues", is_flag=True, help="Skip the per-slice queue series (no folder scan: faster on "
                                                "huge queues).")
@handle_errors
def metrics(folder: str | None, no_queues: bool) -> None:
    """Print every mailq series in the Prometheus text format (this node and the shared tree).

    Queue depth and oldest-entry age per queue and slice, claims, shunt and bad, heartbeat age per
    node, slice-map epoch, self-fencing, runner restarts, and the counters this node's runners
    keep (entries processed/failed, SMTP results, bounces scored, lock waits).  The master can
    serve the same on http://127.0.0.1:PORT/metrics (`metrics: {port: PORT}` in mailq.yaml).
    Exit status 0, or 1 when the shared tree cannot be read.

    \b
    Examples:
      mailqctl metrics
      mailqctl metrics --textfile /var/lib/prometheus/node-exporter   # from cron, see etc/crontab
      mailqctl metrics | grep mailq_queue_waiting
    """
    from mailq.metrics import exposition, write_textfile

    settings = get_settings()
    if folder:
        path = write_textfile(settings, folder, queues=not no_queues)
        click.echo(f"wrote {path}", err=True)
        return
    sys.stdout.buffer.write(exposition(settings, queues=not no_queues))
