"""One module per CLI sub-command. Each exposes ``register(subparsers)``; the parser's
``func`` default receives the parsed args and returns an exit code."""
