"""Checks on what users type in: each returns a message for INVALID_ARGUMENT, or None."""

from __future__ import annotations

import re

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_USERNAME = 64
MAX_RECORD_BYTES = 64 * 1024


def email_problem(email: str) -> str | None:
    if len(email) > 254 or not _EMAIL.fullmatch(email.strip()):
        return "email must look like name@example.com"
    return None


def password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"password must have at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"password must have at most {MAX_PASSWORD} characters"
    return None


def username_problem(username: str) -> str | None:
    if not username.strip():
        return "username must not be empty"
    if len(username) > MAX_USERNAME or not username.isprintable():
        return f"username must be at most {MAX_USERNAME} printable characters"
    return None


def record_problem(data: str) -> str | None:
    if len(data.encode()) > MAX_RECORD_BYTES:
        return f"record data must be at most {MAX_RECORD_BYTES} bytes"
    return None
