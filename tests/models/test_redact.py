"""Secrets never reach a config file or a log line we write (models/redact.py)."""
from __future__ import annotations

import io
import logging

import yaml

from models.redact import REDACTED, install_log_redaction, is_secret_name, redact_text, redact_url, redacted

ACCESS, SECRET, TOKEN = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEXAMPLE"


def test_a_config_dump_keeps_its_shape_and_loses_its_credentials():
    config = {
        "data": {"source": {
            "dataset": f"s3://{ACCESS}:{SECRET}@bucket/dreamactor-v1",
            "shards": [f"https://host/shard-{{0..3}}.tar?X-Amz-Credential={ACCESS}&X-Amz-Signature=abc&part=1"],
            "storage_options": {"key": ACCESS, "secret": SECRET, "token": TOKEN, "profile": "training",
                                "client_kwargs": {"endpoint_url": f"http://{ACCESS}:{SECRET}@minio:9000",
                                                  "region_name": "us-east-1"},
                                "config_kwargs": {"s3": {"addressing_style": "path"}}, "anon": False,
                                "credentials": {"sessionToken": TOKEN}}},
                 "buckets": {"token_budget": 400}},
        "train": {"log": {"sample_keys": True}, "checkpoint": {"key_file": None}},
        "remote": {"api_token": TOKEN, "Password": SECRET, "monkey": "not a key"},
    }
    text = yaml.safe_dump(redacted(config))
    for secret in (ACCESS, SECRET, TOKEN, "Signature=abc"):
        assert secret not in text
    out = yaml.safe_load(text)
    opts = out["data"]["source"]["storage_options"]
    assert opts["key"] == opts["secret"] == opts["token"] == REDACTED
    assert opts["profile"] == "training" and opts["anon"] is False
    assert opts["client_kwargs"] == {"endpoint_url": f"http://{REDACTED}@minio:9000", "region_name": "us-east-1"}
    assert opts["config_kwargs"] == {"s3": {"addressing_style": REDACTED}}  # inside storage_options: not kept
    assert out["data"]["source"]["dataset"] == f"s3://{REDACTED}@bucket/dreamactor-v1"
    assert "part=1" in out["data"]["source"]["shards"][0]
    assert out["data"]["buckets"]["token_budget"] == 400 and out["train"]["log"]["sample_keys"] is True
    assert out["remote"] == {"api_token": REDACTED, "Password": REDACTED, "monkey": "not a key"}
    assert config["data"]["source"]["storage_options"]["key"] == ACCESS  # the run's own config is untouched


def test_secret_looking_names():
    for name in ("aws_secret_access_key", "sessionToken", "X-Amz-Signature", "client_secret", "auth", "PASSWORD",
                 "DREAMACTOR_CHECKPOINT_KEY", "private_key_id"):
        assert is_secret_name(name), name
    for name in ("sample_keys", "keep", "monkey", "tokens_per_s", "dataset", "endpoint_url"):
        assert not is_secret_name(name), name
    assert redact_url("/local/path") == "/local/path"
    assert redact_url("s3://bucket/x?versionId=3") == "s3://bucket/x?versionId=3"


def test_log_lines_are_redacted_by_the_handler_filter():
    stream = io.StringIO()
    logger = logging.getLogger("test_redact")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        install_log_redaction(logger)
        install_log_redaction(logger)  # once
        assert len(handler.filters) == 1
        logger.warning("opening %s with %s", f"s3://{ACCESS}:{SECRET}@bucket/x", {"key": ACCESS, "secret": SECRET})
        logger.warning("env: AWS_SECRET_ACCESS_KEY=%s AWS_SESSION_TOKEN='%s' token_budget=400", SECRET, TOKEN)
        try:
            raise RuntimeError(f"cannot open https://user:{SECRET}@host/x")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert ACCESS not in text and SECRET not in text and TOKEN not in text, text
    assert text.count(REDACTED) >= 6 and "token_budget=400" in text and "RuntimeError" in text
    assert redact_text("loss: 0.25 step: 3") == "loss: 0.25 step: 3"
