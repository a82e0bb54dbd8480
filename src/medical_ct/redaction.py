"""URLs with their secrets taken out, for what is logged: MLflow and the run's log."""

from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"


def redact_url(url: str) -> str:
    """``url`` without its query string and user info, each replaced by ``<redacted>``.

    A presigned S3 URL carries its signature in the query string, and ``user:password@`` its
    password; the scheme, host and path are kept so that a reader still sees where a run's data
    came from. Strings that are not URLs with a host (a local path) come back unchanged; a URL
    that does not parse (an unbalanced "[", a port that is no number) comes back as
    ``<redacted>``, since where its secret ends cannot be told.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return REDACTED
    if not (parts.scheme and host) or not (parts.query or "@" in parts.netloc):
        return url
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    if "@" in parts.netloc:
        netloc = f"{REDACTED}@{netloc}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(value: Any) -> Any:
    """``value`` with every URL in it redacted (``redact_url``), in nested dicts and lists too;
    the original is left as it is."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_urls(item) for item in value]
    return value
