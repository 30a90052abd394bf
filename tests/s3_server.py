"""An S3-compatible server on localhost for tests (moto's server mode), with a log of the requests
it served, so a test can count GETs and tell listings from object reads. No network beyond
127.0.0.1; skipped where moto or s3fs is not installed (`pip install -e '.[dev]'`)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str  # "" for a bucket-level request (a listing)
    query: str
    range: str | None

    @property
    def reads_object(self) -> bool:
        """A GET of an object's bytes (a listing, `?location` or HEAD is not)."""
        return self.method == "GET" and bool(self.key)


@dataclass
class S3Server:
    endpoint: str
    requests: list[Request] = field(default_factory=list)

    def new_bucket(self) -> str:
        import s3fs

        name = f"nola-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return name

    def since(self, mark: int, bucket: str | None = None) -> list[Request]:
        return [r for r in self.requests[mark:] if bucket is None or r.bucket == bucket]


@pytest.fixture(scope="module")
def s3_server():
    """One moto server per test module, the AWS environment pointed at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):
            pass

    app = DomainDispatcherApplication(create_backend_app)
    log: list[Request] = []

    def logged(environ, start_response):
        bucket, _, key = unquote(environ["PATH_INFO"]).lstrip("/").partition("/")
        log.append(Request(environ["REQUEST_METHOD"], bucket, key, environ.get("QUERY_STRING", ""),
                           environ.get("HTTP_RANGE")))
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, logged, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance cached earlier would hold another endpoint
        try:
            yield S3Server(endpoint, log)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.shutdown()
            thread.join(timeout=5)
