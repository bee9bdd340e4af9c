"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

ACCESS_KEY = "AKIASTRATATESTKEY000"
# AWS's own example secret shape: 40 characters holding "/" (redaction must hide it whole)
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSTRATAKEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Bucket:
    name: str
    endpoint: str

    @property
    def options(self) -> dict:
        """fsspec storage options for s3fs reaching this server (what --output-options takes)."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    @property
    def env(self) -> dict:
        """The same through the environment, as a deployment sets it (for CLI subprocesses)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1")
        return env

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not listen on 127.0.0.1:{self.port} within 60 s")

    def bucket(self, hint: str) -> Bucket:
        name = f"{re.sub(r'[^a-z0-9-]+', '-', hint.lower())[:40].strip('-')}-{uuid.uuid4().hex[:8]}"
        b = Bucket(name, self.endpoint)
        b.fs.mkdir(name)
        return b

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
