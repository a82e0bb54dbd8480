"""S3 event messages as SQS delivers them (directly or through SNS); the queue itself is
exercised against moto's server in tests/e2e/test_s3.py."""

import json

import pytest

from medical_ct.changes import NotAnS3Event, event_keys


def s3_event(*keys: str, source: str = "aws:s3") -> dict:
    return {
        "Records": [
            {
                "eventSource": source,
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "bucket"}, "object": {"key": key, "size": 3}},
            }
            for key in keys
        ]
    }


def test_keys_are_decoded_as_s3_encodes_them():
    body = json.dumps(s3_event("raw/CXR/a+b%2Bc.jpeg", "raw/Hand/%C3%A9.jpeg"))
    assert event_keys(body) == ["bucket/raw/CXR/a b+c.jpeg", "bucket/raw/Hand/é.jpeg"]


def test_events_through_sns_and_the_test_event_are_understood():
    wrapped = json.dumps({"Type": "Notification", "Message": json.dumps(s3_event("raw/x"))})
    assert event_keys(wrapped) == ["bucket/raw/x"]
    assert event_keys(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    assert event_keys(json.dumps(s3_event("raw/y", source="aws:other"))) == []


@pytest.mark.parametrize(
    "body",
    ["written by hand", "[1, 2]", json.dumps({"Records": [{"s3": {}}]}), json.dumps({"a": 1})],
)
def test_anything_else_is_refused_with_the_message_shown(body):
    with pytest.raises(NotAnS3Event) as refused:
        event_keys(body)
    assert body[:20] in str(refused.value)
