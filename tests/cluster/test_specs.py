"""What we hand to a cluster is safe as written: every Ray cluster spec turns on Ray's token authentication (the
dashboard's job API runs arbitrary code for whoever reaches it) and binds the dashboard to localhost unless
token auth guards it; the training job takes its checkpoint key and credentials from Kubernetes Secrets."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LOCAL = {"127.0.0.1", "localhost"}


def _ray_starts(commands: list[str]) -> list[str]:
    return [c for c in commands if "ray start" in c]


def _dashboard_host(command: str) -> str:
    m = re.search(r"--dashboard-host[= ](\S+)", command)
    return m.group(1) if m else "localhost"  # Ray's default


def test_the_cluster_launcher_spec_uses_token_auth_and_a_local_dashboard():
    text = (CLUSTER / "preprocess" / "ray-cluster.yaml").read_text()
    spec = yaml.safe_load(text)
    starts = _ray_starts(spec["head_start_ray_commands"]) + _ray_starts(spec["worker_start_ray_commands"])
    assert len(starts) == 2
    for command in starts:  # fails closed: `ray start` refuses to run without a token in token mode
        assert command.startswith("RAY_AUTH_MODE=token ray start"), command
        assert _dashboard_host(command) in LOCAL, command
    assert "--env=RAY_AUTH_MODE=token" in spec["docker"]["run_options"]  # drivers in the container too
    assert spec["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray dashboard cluster/preprocess/ray-cluster.yaml" in text  # the documented way in: port-forwarding


def test_the_kuberay_job_uses_token_auth():
    spec = yaml.safe_load((CLUSTER / "preprocess" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"].get("dashboard-host", "localhost") in LOCAL | {"0.0.0.0"}


def test_the_slurm_script_uses_token_auth_and_a_local_dashboard():
    text = (CLUSTER / "preprocess" / "slurm.sh").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    first_start = next(i for i, line in enumerate(lines) if "ray start" in line)
    exports = lines[:first_start]
    assert "export RAY_AUTH_MODE=token" in exports and "export RAY_AUTH_TOKEN" in exports
    assert any(line.startswith("RAY_AUTH_TOKEN=$(") and "ray get-auth-token --generate" in line for line in exports)
    head = next(line for line in lines if "ray start --head" in line)
    assert _dashboard_host(head) in LOCAL


def test_no_cluster_file_opens_the_dashboard_without_token_auth():
    for path in CLUSTER.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        if re.search(r"dashboard-host[\"']?[:=]\s*[\"']?0\.0\.0\.0", text):
            assert "authOptions" in text and re.search(r"mode:\s*token", text), path


def test_the_training_job_takes_its_secrets_from_kubernetes_secrets():
    job = [d for d in yaml.safe_load_all((CLUSTER / "train" / "k8s-job.yaml").read_text()) if d["kind"] == "Job"][0]
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DREAMACTOR_CHECKPOINT_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "dreamactor-checkpoint-key"
    assert container["envFrom"] == [{"secretRef": {"name": "object-store-credentials"}}]
    assert not any(re.search(r"storage_options|SECRET|secret_access", a) for a in container["args"])
