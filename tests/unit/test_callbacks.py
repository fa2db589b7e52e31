"""Job callbacks: which URLs a tenant may name, and the signature a receiver checks."""

from __future__ import annotations

import re

import pytest

from common import callbacks

pytestmark = pytest.mark.unit

HOSTS = callbacks.allowed_hosts(" hooks.example.com, 127.0.0.1 ,")


def test_a_callback_host_on_the_allow_list_is_accepted() -> None:
    assert {"hooks.example.com", "127.0.0.1"} == HOSTS
    url = "https://HOOKS.example.com/jobs?x=1"
    assert callbacks.check_url(url, HOSTS) == url


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://evil.example.com/", "not allowed"),
        ("ftp://hooks.example.com/", "not an http(s) URL"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("http://169.254.169.254/latest/meta-data", "not allowed"),
        ("hooks.example.com/no-scheme", "not an http(s) URL"),
    ],
)
def test_a_callback_off_the_allow_list_is_refused_naming_the_field(url: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)) as caught:
        callbacks.check_url(url, HOSTS)
    assert str(caught.value).startswith("callback_url: ")


def test_callbacks_are_refused_when_no_host_is_allowed() -> None:
    with pytest.raises(ValueError, match="JOB_CALLBACK_HOSTS is empty"):
        callbacks.check_url("https://hooks.example.com/", callbacks.allowed_hosts(""))


def test_a_signature_verifies_only_for_its_body_timestamp_and_secret() -> None:
    signature = callbacks.sign(b'{"a":1}', "s3cret", 1700000000)
    assert signature.startswith("sha256=")
    assert callbacks.verify(b'{"a":1}', "s3cret", "1700000000", signature)
    assert not callbacks.verify(b'{"a":2}', "s3cret", "1700000000", signature)
    assert not callbacks.verify(b'{"a":1}', "other", "1700000000", signature)
    assert not callbacks.verify(b'{"a":1}', "s3cret", "1700000001", signature)
    assert not callbacks.verify(b'{"a":1}', "s3cret", "soon", signature)
