"""The `authproxy` command: `main` (its commands), `serve` (the serve flags),
`explain` and `explain_report` (why a call would be allowed or denied)."""
