"""Subcommands of the `tide` CLI (one module each, `register(subparsers)`)."""
