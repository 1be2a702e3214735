"""`--redis` URLs: one server, a Sentinel-managed primary or a Redis Cluster; anything else
is refused at start with a message naming what is supported (never a half-configured
proxy). The `retries` parameter reaches the client of every mode."""

from __future__ import annotations

import re

import pytest

from authproxy.runtime.config import ConfigError, ServeConfig, build_state
from authproxy.state.redis_store import RedisState
from authproxy.state.redis_target import DEFAULT_RETRIES, RedisUrlError, parse_redis_url
from tests.support.readme import README, section


def test_a_sentinel_url_names_the_sentinels_the_service_the_db_and_the_credentials():
    target = parse_redis_url(
        "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/mymaster/2?sentinel_password=s3cret"
    )
    assert target.sentinel and not target.tls
    assert target.nodes == (("10.0.0.1", 26379), ("::1", 26380))
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
    assert target.mode == "single" and target.url == url


def test_a_cluster_url_names_the_seed_nodes_and_the_credentials():
    target = parse_redis_url(
        "rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2:7000?ssl_ca_certs=/ca.pem&retries=2"
    )
    assert target.cluster and target.tls and target.retries == 2
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7000))
    assert (target.username, target.password) == ("app", "p@ss")
    assert target.tls_files == {"ssl_ca_certs": "/ca.pem"}


def test_retries_and_wait_replicas_are_the_proxys_and_the_rest_is_left_to_redis_py():
    target = parse_redis_url("redis://h:6379/0?retries=3&health_check_interval=5&wait_replicas=1")
    assert target.retries == 3 and target.wait_replicas == 1
    assert target.url == "redis://h:6379/0?health_check_interval=5"
    assert parse_redis_url("redis+cluster://h:7000?wait_replicas=2").wait_replicas == 2
    assert parse_redis_url("redis://h:6379").retries == DEFAULT_RETRIES


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1?retries=4",
        "redis+sentinel://127.0.0.1:1/svc?retries=4",
        "redis+cluster://127.0.0.1:1?retries=4",
    ],
)
async def test_every_mode_retries_a_broken_connection_as_many_times_as_the_url_says(url: str):
    state = RedisState(url)
    try:
        retry = (
            getattr(state.client, "retry", None)
            or state.client.connection_pool.connection_kwargs["retry"]
        )
        assert retry.get_retries() == 4
    finally:
        await state.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:7000/0", "a Cluster URL is redis+cluster://"),
        ("redis://h:6379?retries=many", "retries must be a whole number"),
        ("redis+sentinel://h:1/svc?wait_replicas=-1", "wait_replicas must be a whole number"),
        ("http://h:6379", "unsupported scheme 'http'"),
        ("redis+sentinel://h:26379", "a Sentinel URL is redis+sentinel://"),
        ("redis+sentinel://h:26379/svc/zero", "a Sentinel URL is redis+sentinel://"),
        ("redis+sentinel://h/svc", "address 'h' is not HOST:PORT"),
        ("redis+sentinel://h:1/svc?password=x", "unknown parameter(s) password"),
    ],
)
def test_a_url_the_proxy_cannot_use_says_why(url: str, problem: str):
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    assert str(caught.value).startswith("--redis: ")
    assert problem in str(caught.value)


def test_the_proxy_refuses_such_a_url_at_start():
    with pytest.raises(ConfigError, match=r"unsupported scheme .redis\+clusters."):
        build_state(ServeConfig(policy="policy.yaml", redis="redis+clusters://h:7000"))


def test_every_concrete_redis_url_in_the_readme_is_one_the_proxy_takes():
    """The README's example URLs (placeholders like `[user:password@]` or `...` aside)
    parse, in each mode its Redis sections show."""
    text = section(README, "## Revocation and single use")
    urls = {
        u.rstrip("`.,")
        for u in re.findall(r"rediss?(?:\+\w+)?://[^\s`]+", text)
        if "[" not in u and "..." not in u
    }
    targets = [parse_redis_url(url) for url in urls]
    assert {t.mode for t in targets} == {"single", "sentinel", "cluster"}, urls
    assert any("ssl_ca_certs=" in t.url for t in targets)
    assert any(t.wait_replicas for t in targets)
