"""Mail out: SMTP to the smarthost or the recipients' MX hosts, VERP, retry policy, bounces."""
