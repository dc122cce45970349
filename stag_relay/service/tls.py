"""TLS for the listener: ``server.tls_cert`` and ``server.tls_key`` serve wss:// and https://.

No trio here: the configuration loader builds the context once to report a bad
certificate or key as a configuration error, and the relay builds it again to wrap
its listeners in ``trio.SSLListener``, and loads the files into it again on SIGHUP
(certificates are renewed more often than relays restart).
"""

from __future__ import annotations

import ssl
from typing import Final

# The only application protocol the port speaks; WebSocket upgrades ride on it.
_ALPN: Final = ["http/1.1"]


class TlsError(ValueError):
    """The certificate or key cannot be used; the message says why, for a person."""


def _no_password() -> str:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key
    # and hang a service that has no terminal.
    raise TlsError("the key is encrypted; give an unencrypted key (restrict its file mode)")


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) for the certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except TlsError:
        raise
    except ssl.SSLError as exc:
        # exc.reason is OpenSSL's short name when it gives one ("KEY_VALUES_MISMATCH");
        # a file that is not PEM of the right kind gives none.
        what = exc.reason or "not a PEM certificate chain and a PEM private key"
        raise TlsError(f"cannot load the certificate and key: {what}") from None
    except OSError as exc:
        raise TlsError(f"cannot read the certificate or key: {exc.strerror}") from None
    return context


def reload_certificate(context: ssl.SSLContext, cert_path: str, key_path: str) -> None:
    """Load the certificate and key again into the live ``context`` (new handshakes use
    them; connections open stay as they are). Raises ``TlsError`` and leaves ``context``
    untouched when the files are not a usable pair: they are tried on a fresh context
    first, because a failed load could leave a new certificate beside the old key."""
    server_context(cert_path, key_path)
    context.load_cert_chain(cert_path, key_path, password=_no_password)
