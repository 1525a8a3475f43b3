"""The schema: one definition, round trips, and the generated docs stay in sync."""
import numpy as np
import pytest

from preprocess import schema
from tests.conftest import ROOT


def test_docs_table_is_generated_from_the_schema():
    doc = (ROOT / "docs" / "data-format.md").read_text()
    for fields in (schema.FIELDS, schema.LATENT_FIELDS):
        assert schema.markdown_table(fields) in doc, "docs/data-format.md is stale: rerun python -m preprocess.schema"


def test_round_trip_and_checks():
    f = schema.field("body_joints3d")
    value = np.random.default_rng(0).normal(size=(7, schema.N_BODY, 3))
    back = schema.decode(f, schema.encode(f, value))
    assert back.dtype == np.float32 and back.shape == (7, schema.N_BODY, 3)
    assert schema.check_value(f, back, 7) is None
    assert "shape" in schema.check_value(f, back, 8)
    meta = schema.field("meta")
    assert "missing keys" in schema.check_value(meta, {"key": "x"}, 1)


def test_keys_are_dot_free_and_unknown_fields_are_named():
    k = schema.clip_key("0123456789abcdef", 7)
    assert k == "0123456789abcdef_0007" and schema.KEY_RE.match(k)
    with pytest.raises(KeyError, match="unknown shard field"):
        schema.field("skeleton")
    assert len({f.member for f in schema.FIELDS}) == len(schema.FIELDS)
    assert all("." not in f.name for f in schema.FIELDS)
