"""stag-relay: StreamKit packets in over WebSocket, batched spatial events out to STAG."""

__version__ = "0.1.0"
