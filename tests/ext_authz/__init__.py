"""Tests of the Envoy ext_authz front ends (`proxy/ext_authz/`)."""
