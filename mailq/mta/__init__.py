"""Mail in: the MTA pipe entry point (``mailq-deliver``), the LMTP server and alias generation."""
