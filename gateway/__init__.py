"""The gateway core: rooms, the event contract, fan-out, web pages and the CLI."""
