"""Assembling and operating the proxy: `config` (every setting, checked before anything
listens), `serve` (the composition root: builds every object and runs the front ends),
`workers`, `operations` (metrics, decision log, reloads, readiness), `admin` (the admin
API), `metrics`, `decision_log`, `policy_reload`, `file_watch`, and TLS
(`tls`, `tls_context`, `tls_files`)."""
