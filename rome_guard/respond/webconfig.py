"""TLS and basic auth for the metrics endpoint, from a Prometheus web config.

The file has the format of Prometheus exporters' ``--web.config.file``
(exporter-toolkit), so a fleet can reuse the certificates and password
hashes it already deploys for node_exporter::

    tls_server_config:
      cert_file: server.crt        # relative paths are relative to this file
      key_file: server.key
      client_ca_file: ca.crt       # optional: mutual TLS
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...       # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':')

Parsing is pure and reports mistakes as ``file:line``; ``ssl_context()``
reads the certificate files. This module never logs, stores or returns a
password, and never keeps a hash in an error message.
"""

from __future__ import annotations

import hmac
import os
import re
import ssl
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rome_guard.yamlsrc import LineDict, Location, SourceError, load_file

# exporter-toolkit's names, limited to the modes Python's ssl module can honour.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

_TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type")
_TLS_KEYS += ("min_version", "max_version")
# Accepted for compatibility with node_exporter configs; the exporter-toolkit
# options we cannot honour are errors rather than silently ignored.
_HTTP_KEYS = ("http2",)
_BCRYPT_HASH = re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = ""


@dataclass(frozen=True)
class WebConfig:
    """What the metrics server needs: TLS settings and bcrypt hashes by user."""

    tls: TlsConfig | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server context with the certificates loaded, None without TLS.
        Raises SourceError naming the file when a certificate is unusable."""
        if self.tls is None:
            return None
        tls = self.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        if tls.max_version:
            context.maximum_version = TLS_VERSIONS[tls.max_version]
        where = Location(self.source or "<web config>", 1)
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(
                [(where, f"cannot load cert_file {tls.cert_file} / key_file {tls.key_file}: {exc}")]
            ) from None
        if tls.client_ca_file:
            try:
                context.load_verify_locations(cafile=tls.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise SourceError(
                    [(where, f"cannot load client_ca_file {tls.client_ca_file}: {exc}")]
                ) from None
        context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
        return context

    def warnings(self) -> list[str]:
        """Settings that work but that an operator should hear about."""
        if self.users and self.tls is None:
            return [
                f"{self.source}: basic_auth_users without tls_server_config: "
                "passwords cross the network in clear text"
            ]
        return []


# --- parsing (pure) ----------------------------------------------------------


def _string(raw: LineDict, key: str, prefix: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise SourceError([(raw.where(key), f"{prefix}{key} must be a non-empty string")])
    return value


def _choice(raw: LineDict, key: str, prefix: str, allowed: Mapping[str, Any]) -> str:
    value = _string(raw, key, prefix)
    if value not in allowed:
        names = ", ".join(allowed)
        raise SourceError(
            [(raw.where(key), f"{prefix}{key} must be one of {names}, got {value!r}")]
        )
    return value


def _only(raw: LineDict, known: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise SourceError(
                [
                    (
                        raw.where(key),
                        f"unsupported key {prefix}{key!s} (supported: {', '.join(known)})",
                    )
                ]
            )


def _parse_tls(raw: Any, base_dir: str, loc: Location) -> TlsConfig:
    prefix = "tls_server_config."
    if not isinstance(raw, LineDict):
        raise SourceError([(loc, "tls_server_config must be a mapping")])
    _only(raw, _TLS_KEYS, prefix)
    for key in ("cert_file", "key_file"):
        if key not in raw:
            raise SourceError([(loc, f"{prefix}{key} is required")])
    values: dict[str, str] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        if key in raw:
            values[key] = os.path.join(base_dir, _string(raw, key, prefix))
    if "client_auth_type" in raw:
        values["client_auth_type"] = _choice(raw, "client_auth_type", prefix, CLIENT_AUTH_TYPES)
    for key in ("min_version", "max_version"):
        if key in raw:
            values[key] = _choice(raw, key, prefix, TLS_VERSIONS)
    tls = TlsConfig(**values)
    if tls.client_auth_type != "NoClientCert" and not tls.client_ca_file:
        raise SourceError(
            [(raw.where("client_auth_type"), f"{prefix}client_auth_type needs client_ca_file")]
        )
    return tls


def _parse_users(raw: Any, loc: Location) -> dict[str, str]:
    if not isinstance(raw, LineDict):
        raise SourceError([(loc, "basic_auth_users must be a mapping of user: bcrypt hash")])
    users: dict[str, str] = {}
    for user, hashed in raw.items():
        where = raw.where(user)
        if not user or ":" in user:
            raise SourceError([(where, "basic_auth_users: a user name is non-empty, without ':'")])
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            # never echo the value: it may be a password pasted by mistake
            raise SourceError(
                [(where, f"basic_auth_users.{user}: not a bcrypt hash ($2a$, $2b$ or $2y$)")]
            )
        users[user] = hashed
    return users


def parse_web_config(raw: Any, path: str) -> WebConfig:
    """Validate a parsed web config document; relative paths are resolved
    against the directory of path, as exporter-toolkit does."""
    if raw is None:
        return WebConfig(source=path)
    if not isinstance(raw, LineDict):
        raise SourceError([(Location(path, 1), "the web config must be a mapping")])
    _only(raw, ("tls_server_config", "basic_auth_users", "http_server_config"), "")
    base_dir = os.path.dirname(os.path.abspath(path))
    tls = None
    if raw.get("tls_server_config") is not None:
        tls = _parse_tls(raw["tls_server_config"], base_dir, raw.where("tls_server_config"))
    users: dict[str, str] = {}
    if raw.get("basic_auth_users") is not None:
        users = _parse_users(raw["basic_auth_users"], raw.where("basic_auth_users"))
        if users:
            try:
                password_checker()  # fail at load, not at the first scrape
            except RuntimeError as exc:
                raise SourceError([(raw.where("basic_auth_users"), str(exc))]) from None
    http = raw.get("http_server_config")
    if http is not None:
        if not isinstance(http, LineDict):
            raise SourceError([(raw.where("http_server_config"), "must be a mapping")])
        _only(http, _HTTP_KEYS, "http_server_config.")
    return WebConfig(tls=tls, users=users, source=path)


def load_web_config(path: str) -> WebConfig:
    """The web config at path, with its certificates checked by loading them."""
    docs = load_file(path)
    if len(docs) > 1:
        raise SourceError([(Location(path, 1), "expected one YAML document")])
    config = parse_web_config(docs[0] if docs else None, path)
    config.ssl_context()
    return config


# --- password checks ---------------------------------------------------------

PasswordChecker = Callable[[bytes, bytes], bool]
# A valid hash of a random password: unknown users cost as much as known ones.
_DUMMY_HASH = b"$2b$10$F/g9VOvPBImy5O38kYJPt.2AQrD9WP6ooFmNUjCfAua/9e5h6cD7y"


def _crypt_checker() -> PasswordChecker | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13; bcrypt-capable only with libxcrypt
    except ImportError:
        return None

    def check(password: bytes, hashed: bytes) -> bool:
        try:
            result = crypt.crypt(password.decode("utf-8"), hashed.decode("ascii"))
        except (ValueError, UnicodeDecodeError):  # NUL bytes, undecodable input
            return False
        return result is not None and hmac.compare_digest(result.encode(), hashed)

    probe = "$2b$04$" + "." * 22
    try:
        probed = crypt.crypt("probe", probe)
    except (OSError, ValueError):
        return None
    return check if probed and probed.startswith("$2b$04$") else None


def password_checker() -> PasswordChecker:
    """bcrypt verification: the bcrypt package where installed, else the
    libc crypt(3) of libxcrypt. Raises RuntimeError naming the fix when
    neither can verify $2b$ hashes."""
    try:
        import bcrypt
    except ImportError:
        checker = _crypt_checker()
        if checker is None:
            raise RuntimeError(
                "basic_auth_users needs bcrypt: install the 'bcrypt' Python package "
                "(pip install bcrypt) into rome-guard's environment"
            ) from None
        return checker

    def check(password: bytes, hashed: bytes) -> bool:
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:  # bcrypt>=5 refuses passwords over 72 bytes
            return False

    return check


class BasicAuth:
    """Checks user/password pairs against bcrypt hashes.

    bcrypt is slow on purpose, and anyone who can reach the port (a local
    agent included) can send guesses: checks run one at a time, so guessing
    costs the guard at most one core, and a correct pair is remembered (by a
    keyed digest, never in clear) so that each scrape does not pay again.
    """

    CACHE_SIZE = 64

    def __init__(self, users: Mapping[str, str], checker: PasswordChecker | None = None):
        self._users = {user: hashed.encode("ascii") for user, hashed in users.items()}
        self._check = checker or password_checker()
        self._lock = threading.Lock()
        self._cache_key = os.urandom(32)
        self._good: OrderedDict[bytes, None] = OrderedDict()

    def verify(self, user: str, password: bytes) -> bool:
        hashed = self._users.get(user)
        digest = hmac.new(
            self._cache_key, user.encode("utf-8", "surrogateescape") + b"\0" + password, "sha256"
        ).digest()
        with self._lock:
            if hashed is not None and digest in self._good:
                self._good.move_to_end(digest)
                return True
            ok = self._check(password, hashed if hashed is not None else _DUMMY_HASH)
            if ok and hashed is not None:
                self._good[digest] = None
                if len(self._good) > self.CACHE_SIZE:
                    self._good.popitem(last=False)
                return True
            return False
