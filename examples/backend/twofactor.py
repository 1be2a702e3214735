"""TOTP second factor (RFC 6238) with pyotp: enrolment and checking a code.

A code is accepted one step either side of now (`valid_window=1`), and only once: the
caller stores the returned time step and passes it back as `last_step`.
"""

from __future__ import annotations

import hmac
import time

import pyotp

ISSUER_NAME = "authproxy example"


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, account: str) -> str:
    """The otpauth:// URI an authenticator app scans."""
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=ISSUER_NAME)


def accepted_step(secret: str, code: str, last_step: int, now: float | None = None) -> int | None:
    """The time step `code` belongs to if it is valid and newer than `last_step`, else None."""
    totp = pyotp.TOTP(secret)
    code = code.strip()
    if len(code) != totp.digits or not code.isdigit():
        return None
    now = time.time() if now is None else now
    if not totp.verify(code, for_time=now, valid_window=1):
        return None
    current = int(now // totp.interval)
    for step in (current - 1, current, current + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step if step > last_step else None
    return None
