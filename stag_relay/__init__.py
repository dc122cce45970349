"""stag-relay: StreamKit packets in over WebSocket, batched spatial events out to STAG.

Layers (docs/architecture.md): ``protocol`` is pure; ``pipeline`` runs it in Trio tasks;
``service`` configures and wires them into the daemon; ``tools`` serve developers only.
"""

import sys

__version__ = "0.1.0"

# structlog imports rich, when it is installed (the tools extra), for the console
# renderer's tracebacks: the daemon would load a terminal library it never uses, and
# log differently with the extra than without. Importing structlog here with rich
# hidden makes it go without, as in a plain install; the tools, which use rich, import
# it themselves afterwards.
if "structlog" not in sys.modules:
    # What was there goes back: the module, a None someone else put there, or nothing.
    _had_rich = "rich" in sys.modules
    _rich = sys.modules.get("rich")
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich: ImportError
    try:
        import structlog  # noqa: F401
    finally:
        if _had_rich:
            sys.modules["rich"] = _rich  # type: ignore[assignment]
        else:
            del sys.modules["rich"]


def __getattr__(name: str) -> object:
    # apply_mesh_diff (STAG's reconstruction recipe) needs numpy and DracoPy: load
    # them only when it is asked for, not on every `import stag_relay`.
    if name == "apply_mesh_diff":
        from stag_relay.protocol.geometry import apply_mesh_diff

        return apply_mesh_diff
    raise AttributeError(f"module 'stag_relay' has no attribute {name!r}")
