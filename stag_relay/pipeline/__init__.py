"""Trio tasks that move bytes between sockets and the protocol objects; no wiring, no CLI."""
