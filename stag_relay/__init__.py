"""stag-relay: StreamKit packets in over WebSocket, batched spatial events out to STAG.

Layers (docs/architecture.md): ``protocol`` is pure; ``pipeline`` runs it in Trio tasks;
``service`` configures and wires them into the daemon; ``tools`` serve developers only.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # apply_mesh_diff (STAG's reconstruction recipe) needs numpy and DracoPy: load
    # them only when it is asked for, not on every `import stag_relay`.
    if name == "apply_mesh_diff":
        from stag_relay.protocol.geometry import apply_mesh_diff

        return apply_mesh_diff
    raise AttributeError(f"module 'stag_relay' has no attribute {name!r}")
