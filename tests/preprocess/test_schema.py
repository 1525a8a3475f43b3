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


def test_version_1_datasets_still_read_and_the_fit_fields_are_optional(tmp_path):
    """Schema 2 only added optional SMPL-X fields: a version-1 dataset (the committed fixture, made before) validates;
    an unknown version is named."""
    import shutil
    from pathlib import Path

    from preprocess import schema
    from preprocess.validate import validate

    schema.check_version({"schema_version": 1}, "old")
    schema.check_version({"schema_version": schema.SCHEMA_VERSION}, "new")
    with pytest.raises(ValueError, match="schema_version 99"):
        schema.check_version({"schema_version": 99}, "future")
    assert all(f.optional for f in schema.FIELDS if f.name.startswith("smplx_"))
    src = Path(__file__).parent / "fixtures" / "dataset_before_consolidation"
    shutil.copytree(src, tmp_path / "ds")
    assert '"schema_version": 1' in (tmp_path / "ds" / "dataset.json").read_text()
    assert validate(str(tmp_path / "ds"), log=lambda *a: None) == []
