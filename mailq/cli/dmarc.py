"""``mailqctl dmarc``: the DMARC policy of mail domains, as the ``dmarc`` stage sees it."""
from __future__ import annotations

import time

import click

from mailq.cli.common import config_option, emit_json, get_settings, handle_errors, json_option, print_table


@click.command("dmarc")
@click.argument("domains", nargs=-1, required=True)
@click.option("--refresh", is_flag=True, help="Ask DNS again instead of the shared cache (and cache the answer).")
@config_option
@json_option
@click.pass_context
@handle_errors
def dmarc(ctx: click.Context, domains: tuple[str, ...], refresh: bool, config_file: str | None,
          as_json: bool) -> None:
    """Show the DMARC policy each DOMAIN publishes, as the list pipeline decides it.

    The answer comes from the shared cache (var/cache/dmarc) while it is fresh, else from the
    resolvers of the dns: config section, exactly as the `dmarc` stage gets it; it says which
    record decided (the domain's own, or its organizational domain's) and until when the
    answers are cached. Posts From a domain whose policy is reject or quarantine get the list's
    dmarc_mitigate_action. A DNS failure shows as no policy, with the failure.

    Exit status: 0 when every answer came (a policy, or none published); 1 when a lookup failed
    or a DOMAIN is not a domain name.

    \b
    Examples:
      mailqctl dmarc gmail.com mail.example.co.uk
      mailqctl dmarc --refresh example.org --json
    """
    from mailq.dmarc import DmarcCache, normalize_domain, organizational_domain

    if config_file:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file
    settings = get_settings(ctx)
    cache = DmarcCache(settings)
    results = []
    for domain in domains:
        found = cache.policy(domain, refresh=refresh)
        name = normalize_domain(domain)
        asked = []
        for owner in dict.fromkeys(filter(None, (name, organizational_domain(name) if name else None))):
            entry = cache.read(cache.path(f"_dmarc.{owner}"), f"_dmarc.{owner}")
            if entry is not None:
                asked.append({"name": entry["name"], "state": entry["state"], "records": entry.get("records", []),
                              "expires": entry["expires"], "asked_by": entry.get("node", "")})
        trouble = found.failed or name is None
        results.append({"domain": domain, "policy": found.policy or "none published", "strict": found.strict,
                        "source": found.source, "record": found.record, "why": found.why,
                        "dns_failed": found.failed, "answers": asked, "ok": not trouble})
    status = 0 if all(r["ok"] for r in results) else 1
    if as_json:
        emit_json(results)
        ctx.exit(status)
    rows = []
    for r in results:
        until = min((a["expires"] for a in r["answers"]), default=0)
        rows.append([r["domain"], r["policy"], r["source"] or "-", r["record"] or r["why"] or "-",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until)) + " UTC" if until else "-"])
    print_table(rows, ["DOMAIN", "POLICY", "FROM", "RECORD / WHY", "CACHED UNTIL"])
    ctx.exit(status)
