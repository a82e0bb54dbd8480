"""What logging keeps of a URL: where the data came from, not the secret that opened it."""

import pytest

from medical_ct.redaction import redact_url, redact_urls


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (
            "https://bucket.s3.amazonaws.com/MedNIST.tar.gz?X-Amz-Signature=abc&X-Amz-Expires=60",
            "https://bucket.s3.amazonaws.com/MedNIST.tar.gz?<redacted>",
        ),
        ("https://user:pa55@host.org:8443/a/b.tgz", "https://<redacted>@host.org:8443/a/b.tgz"),
        ("http://token@[::1]:80/x?sig=1", "http://<redacted>@[::1]:80/x?<redacted>"),
        ("https://host.org/MedNIST.tar.gz", "https://host.org/MedNIST.tar.gz"),
        ("/data/MedNIST.tar.gz", "/data/MedNIST.tar.gz"),
        ("file:///data/MedNIST.tar.gz", "file:///data/MedNIST.tar.gz"),
        ("not a url?x=1", "not a url?x=1"),
        ("http://u:p@[broken/path?x=1", "<redacted>"),
        ("https://u:p@host:port/x", "<redacted>"),
    ],
)
def test_a_url_loses_its_query_and_user_info_only(url, logged):
    assert redact_url(url) == logged


def test_nested_parameters_are_redacted_in_a_copy():
    params = {"ingest": {"url": "https://u:p@h/x?s=1", "md5": "0" * 32}, "urls": ["https://h/?a"]}
    redacted = redact_urls(params)
    assert redacted == {
        "ingest": {"url": "https://<redacted>@h/x?<redacted>", "md5": "0" * 32},
        "urls": ["https://h/?<redacted>"],
    }
    assert params["ingest"]["url"] == "https://u:p@h/x?s=1"
