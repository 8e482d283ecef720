"""Command-line interfaces (click). Thin: parse, call the core, print."""
