"""Fixtures of the preprocessing tests: an S3 server (moto) on loopback."""
import pytest


@pytest.fixture()
def s3(monkeypatch):
    """A moto S3 server with buckets ``raw`` and ``shards``; AWS_* variables point pyarrow and boto3 at it."""
    moto_server = pytest.importorskip("moto.server")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for b in ("raw", "shards"):
        client.create_bucket(Bucket=b)
    yield client
    srv.stop()
