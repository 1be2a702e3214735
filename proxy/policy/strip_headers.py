"""Headers that never reach the backend, beyond the proxy's own `x-auth-*` and `authorization`.

Two groups:

- **Identity-looking headers** other auth proxies set for their backends (oauth2-proxy's
  `x-forwarded-user`, Authelia's `remote-user`, Pomerium's `x-pomerium-*`, ...). A backend
  that once sat behind such a proxy, or shares code with one that does, may trust them; a
  client could forge them. `DEFAULT_IDENTITY` is removed on every call, public ones too;
  the policy's `strip_headers:` adds names and may explicitly keep a default
  (`policy/strip_section.py`).
- **Method and URL override headers** (`OVERRIDE_HEADERS`): frameworks that honour
  `X-HTTP-Method-Override: DELETE` or `X-Original-URL: /admin` would run another method
  or route than the one authorized. They are always removed (the policy cannot keep
  them), and `override_problem` lets the ext_authz front ends refuse a request whose
  override names another method or URL.

Names are matched lowercase with `_` read as `-` (backends that fold underscores would
read `x_forwarded_user` as `x-forwarded-user`). Matching costs one set lookup and one
`str.startswith` over a tuple of prefixes: no regex per header.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Override headers that name a method: the request's own method (any case) is allowed.
METHOD_OVERRIDES = frozenset(
    (
        "x-http-method-override",  # Google APIs, Express, Rack, Symfony, ASP.NET Core
        "x-http-method",  # OData / Microsoft
        "x-method-override",
        "x-original-method",  # ingress-nginx external auth
    )
)
#: Override headers that name a URL: the request's own path (with or without its query) is
#: allowed.
URL_OVERRIDES = frozenset(
    (
        "x-original-url",  # IIS URL Rewrite, ingress-nginx; Symfony honoured it (CVE-2018-14773)
        "x-original-uri",  # nginx auth_request convention
        "x-rewrite-url",  # IIS ISAPI_Rewrite
    )
)
OVERRIDE_HEADERS = METHOD_OVERRIDES | URL_OVERRIDES

#: Identity headers of other auth proxies and platforms, removed unless the policy keeps
#: them. Entries ending in `-*` are prefixes.
DEFAULT_IDENTITY = (
    # oauth2-proxy (its x-auth-request-* are covered by x-auth-*)
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "gap-auth",
    # Authelia, Authentik, Traefik forward auth
    "remote-user",
    "remote-groups",
    "remote-name",
    "remote-email",
    "x-authentik-*",
    # Apache mod_auth / CGI REMOTE_USER as a header, Kubernetes front proxies
    "x-remote-user",
    "x-remote-group",
    "x-remote-groups",
    "x-remote-extra-*",
    # Pomerium
    "x-pomerium-*",
    # Istio / Envoy jwt_authn payload forwarding, API gateways
    "x-jwt-payload",
    "x-jwt-assertion",
    # Grafana-style auth proxies and generic conventions
    "x-webauth-user",
    "x-user",
    "x-user-id",
    "x-username",
    "x-email",
    # Google IAP, AWS ALB, Azure App Service, Cloudflare Access
    "x-goog-authenticated-user-*",
    "x-goog-iap-jwt-assertion",
    "x-amzn-oidc-*",
    "x-ms-client-principal",
    "x-ms-client-principal-*",
    "x-ms-token-*",
    "cf-access-jwt-assertion",
    "cf-access-authenticated-user-email",
)


@dataclass(frozen=True, slots=True)
class StripHeaders:
    """The headers to remove: exact names and name prefixes, lowercase, `-` for `_`."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    #: First characters (both cases) of every name and prefix: a cheap pre-filter.
    initials: frozenset[str]

    @classmethod
    def of(cls, entries: Iterable[str]) -> StripHeaders:
        """From entries like `x-forwarded-user` and `x-pomerium-*` (already normalized)."""
        entries = tuple(entries)
        names = {e for e in entries if not e.endswith("*")} | OVERRIDE_HEADERS
        prefixes = tuple(sorted(e[:-1] for e in entries if e.endswith("*")))
        initials = {e[:1] for e in (*names, *prefixes)}
        return cls(
            frozenset(names),
            prefixes,
            frozenset(initials | {c.upper() for c in initials}),
        )

    def matches(self, lower: str) -> bool:
        """Whether a lowercase header name is removed."""
        if "_" in lower:
            lower = lower.replace("_", "-")
        return lower in self.names or lower.startswith(self.prefixes)


DEFAULT_STRIP = StripHeaders.of(DEFAULT_IDENTITY)


def override_problem(
    method: str, path: str, headers: Iterable[tuple[str, str | bytes]]
) -> str | None:
    """Why a request must be refused for an override header naming another method or URL
    than its own (None when it has none, or only ones that repeat its own)."""
    for key, value in headers:
        if key[:1] not in "xX":
            continue
        name = key.lower()
        if "_" in name:
            name = name.replace("_", "-")
        if name not in OVERRIDE_HEADERS:
            continue
        text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
        if name in METHOD_OVERRIDES:
            if text.upper() == method.upper():
                continue
            own = f"the request's method is {method[:16]!r}"
        else:
            if text in (path, path.partition("?")[0]):
                continue
            own = f"the request's path is {path[:64]!r}"
        return (
            f"header {key.lower()[:64]!r} asks for {text[:64]!r}, but {own}: method and URL"
            " override headers are refused, since the backend might honour them"
        )
    return None
