"""The test keys (`Keys`: the JWKS file and the signing keys of each token level) and the
refresh level's HMAC secret, given to the proxy through the environment variable
`REFRESH_ENV`. The `keys` fixture (tests/conftest.py) makes them once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from authproxy.keys.issuer import SigningKey

REFRESH_SECRET = b"r" * 40
REFRESH_ENV = "AUTHPROXY_TEST_REFRESH_SECRET"


@dataclass
class Keys:
    dir: Path
    jwks: Path
    es256: SigningKey
    rs256: SigningKey
    refresh: SigningKey
