"""Secrets never reach a file or a log line we write: the one redaction of configs, URLs and log records.

A resolved config is written into every checkpoint (``config.yaml``) and next to every export, and log lines
quote URLs and options; object-store credentials given in the config (``data.source.storage_options``), in a URL
(``s3://KEY:SECRET@bucket``, a presigned ``?X-Amz-Signature=...``) or in a message would be copied to every
reader of those files. What counts as a secret:

- a key whose name has a secret-looking word (:data:`SECRET_WORDS`: ``aws_secret_access_key``, ``token``,
  ``sessionToken``, ``password``, ``client_secret``, ...) and a value that is not a number or a bool
  (``data.buckets.token_budget: 400`` is no secret);
- every value inside a ``storage_options`` mapping (fsspec passes them to the object store: keys, tokens,
  profiles, whole credential objects), except the few that only say where the store is (:data:`NOT_SECRET`);
- the user and password of a URL, and URL query parameters with a secret-looking name.

Prefer giving credentials through the environment or the machine's role (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles, Kubernetes secrets as env): then no config holds them.
"""
from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"
# Words that make a key name secret-looking (matched against the name's words: ``sample_keys`` is not ``key``).
SECRET_WORDS = frozenset({
    "key", "secret", "secrets", "token", "password", "passwd", "pwd", "passphrase", "credential", "credentials",
    "session", "auth", "authorization", "signature", "sig", "cookie", "private", "apikey", "bearer", "sas",
})
# storage_options entries that only say where the store is (kept, with a URL's userinfo removed).
NOT_SECRET = frozenset({"endpoint_url", "endpoint", "region", "region_name", "profile", "anon", "use_ssl",
                        "requester_pays", "default_fill_cache", "default_block_size"})
OPTION_MAPS = ("storage_options",)

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# user[:password]@ after a scheme; a password may hold '/' (raw AWS secrets do), a user name may not
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]*:[^@\s'\"]*|[^/:@\s'\"]+)@")
_NUMBER = re.compile(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?|true|false|True|False|None|null")
# name=value, name: value, 'name': 'value', "name": "value" (a log line quoting a dict, an env dump, a command
# line) whose name holds a secret-looking word (checked exactly by is_secret_name: "monkey" is no "key")
_NAME = r"[A-Za-z0-9_\-.]*(?:key|secret|token|passw|pwd|passphrase|credential|session|auth|signature|sig|cookie" \
        r"|private|bearer|sas)[A-Za-z0-9_\-.]*"
_ASSIGNMENT = re.compile(r"(?P<name>['\"]?" + _NAME + r"['\"]?)(?P<sep>\s*[:=]\s*)"
                         r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&'\"}\])]+)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a key name (``aws_secret_access_key``, ``sessionToken``, ``X-Amz-Signature``) looks secret."""
    words = {w.lower() for w in _WORD_SPLIT.split(str(name)) if w}
    return bool(words & SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` without its user/password and without query parameters whose names look secret."""
    if not isinstance(url, str) or "://" not in url:
        return url
    url = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    query = [(k, REDACTED if is_secret_name(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="<>")))


def redacted(config: Any, _in_options: bool = False) -> Any:
    """A copy of plain config data (dicts, lists, scalars) with every secret replaced by ``<redacted>``."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            name = str(k)
            if _in_options and not isinstance(v, dict) and name not in NOT_SECRET:
                out[k] = _redact_value(v)
            elif is_secret_name(name) and not _harmless(v):
                out[k] = _redact_value(v)
            else:
                out[k] = redacted(v, _in_options or name in OPTION_MAPS)
        return out
    if isinstance(config, (list, tuple)):
        return type(config)(redacted(v, _in_options) for v in config)
    if isinstance(config, str):
        return redact_url(config)
    return config


def _harmless(value: Any) -> bool:
    """Numbers, bools and unset values are never credentials (``token_budget: 400``, ``sample_keys: true``)."""
    return value is None or isinstance(value, (bool, int, float))


def _redact_value(value: Any) -> Any:
    """A secret value replaced, keeping the shape of a mapping (its keys say what was configured)."""
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value if _harmless(value) else REDACTED


def redact_text(text: str) -> str:
    """A free-form line (a log message) with URL credentials and ``secret_name=value`` pairs redacted."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)

    def one(m: re.Match) -> str:
        value = m["value"].strip("'\"")
        if not is_secret_name(m["name"].strip("'\"")) or value in ("", REDACTED) or _NUMBER.fullmatch(value):
            return m[0]
        quote = m["value"][0] if m["value"][0] in "'\"" else ""
        return f"{m['name']}{m['sep']}{quote}{REDACTED}{quote}"

    return _ASSIGNMENT.sub(one, text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record's message (and its traceback) before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (the root logger: what a job's logging
    configuration writes to stdout and files), once."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
