"""Keys and token verification: where keys come from (`sources`: JWKS files and URLs,
OIDC discovery, PEM, HMAC secrets), the live set of them (`ring`, reloaded and refreshed),
which key may verify a token (`selection`), and verifying a token for a level (`verify`:
type, audience, issuer, signature, expiry). `issuer` and `keygen` mint tokens and keys for
tests, the example backend and the CLI."""
