"""`--redis` URLs: one server, or a Sentinel-managed primary; anything else is refused at
start with a message naming what is supported (never a half-configured proxy)."""

from __future__ import annotations

import pytest

from authproxy.runtime.config import ConfigError, ServeConfig, build_state
from authproxy.state.redis_target import RedisUrlError, parse_redis_url


def test_a_sentinel_url_names_the_sentinels_the_service_the_db_and_the_credentials():
    target = parse_redis_url(
        "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/mymaster/2?sentinel_password=s3cret"
    )
    assert target.sentinel and not target.tls
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service, target.db) == ("mymaster", 2)
    assert (target.username, target.password) == ("app", "p@ss")
    assert target.sentinel_auth == {"password": "s3cret"}


def test_tls_to_the_primary_with_a_ca_bundle():
    target = parse_redis_url("rediss+sentinel://h:26379/cache?ssl_ca_certs=/etc/ca.pem")
    assert target.tls and target.db == 0
    assert target.tls_files == {"ssl_ca_certs": "/etc/ca.pem"}


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://u:p@h:6380", "unix:///run/r.sock"])
def test_one_server_urls_are_what_redis_py_reads(url: str):
    target = parse_redis_url(url)
    assert not target.sentinel and target.url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:7000", "unsupported scheme 'redis+cluster'"),
        ("http://h:6379", "unsupported scheme 'http'"),
        ("redis+sentinel://h:26379", "a Sentinel URL is redis+sentinel://"),
        ("redis+sentinel://h:26379/svc/zero", "a Sentinel URL is redis+sentinel://"),
        ("redis+sentinel://h/svc", "sentinel address 'h' is not HOST:PORT"),
        ("redis+sentinel://h:1/svc?password=x", "unknown parameter(s) password"),
    ],
)
def test_a_url_the_proxy_cannot_use_says_why(url: str, problem: str):
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    assert str(caught.value).startswith("--redis: ")
    assert problem in str(caught.value)


def test_the_proxy_refuses_such_a_url_at_start():
    with pytest.raises(ConfigError, match="Redis Cluster is not supported"):
        build_state(ServeConfig(policy="policy.yaml", redis="redis+cluster://h:7000"))
