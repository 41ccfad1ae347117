"""Each example runs as its docstring says, in its own process, on a real server (uvicorn,
gunicorn with threads, Flask's threaded dev server), against the strict STS on loopback and
moto's S3; the strict STS fetches the app's JWKS from the app itself, as AWS does."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest

from servers.sts import StrictSTS
from stscreds import SigningKey

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"  # examples/settings.py's default STSCREDS_ACCOUNT_ID
ACME_ARN = f"arn:aws:iam::{ACCOUNT}:role/tenant-acme"
BETA_ARN = f"arn:aws:iam::{ACCOUNT}:role/tenant-beta"
REPORTS_ARN = f"arn:aws:iam::{ACCOUNT}:role/reports"
OBJECTS = {"tenant-acme": ["a.txt", "b.txt"], "tenant-beta": ["c.txt"], "reports": ["q1.csv"]}


@pytest.fixture(scope="module")
def buckets(moto_sts: str) -> dict[str, list[str]]:
    """The buckets the examples list, in moto's S3 (which accepts any credentials)."""
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_sts,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP",
        aws_secret_access_key="setup",
    )
    for bucket, keys in OBJECTS.items():
        s3.create_bucket(Bucket=bucket)
        for key in keys:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    s3.close()
    return OBJECTS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class App:
    """An example app in its own process; ``output`` is what it printed."""

    def __init__(self, base: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base, self.process, self.log = base, process, log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers=headers, timeout=30, trust_env=False)

    def get_many(self, path: str, headers: list[dict[str, str]]) -> list[httpx.Response]:
        """Concurrent requests, each on its own connection."""
        with ThreadPoolExecutor(max_workers=len(headers)) as pool:
            return list(pool.map(lambda h: self.get(path, **h), headers))


@pytest.fixture
def example_env(
    tmp_path: Path, strict_sts: StrictSTS, moto_sts: str, buckets: dict[str, list[str]]
) -> dict[str, str]:
    """Environment for an example on a free port: its own key file, STS and S3 endpoints."""
    key = SigningKey.generate("ES256")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.to_pem())
    base = f"http://127.0.0.1:{free_port()}"
    # jwks=None: the strict STS discovers the keys from the issuer, i.e. from the app itself.
    strict_sts.configure(issuer=base, jwks=None)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NO_PROXY": "127.0.0.1,localhost",
        "STSCREDS_ISSUER": base,
        "STSCREDS_KEY_FILE": str(key_file),
        "STSCREDS_STS_ENDPOINT": strict_sts.url,
        "STSCREDS_S3_ENDPOINT": moto_sts,
        "STSCREDS_REGION": "us-east-1",
        "STSCREDS_DJANGO_DB": str(tmp_path / "django.sqlite3"),
    }


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[App]:
    """Start ``command``, wait until it serves the issuer's OIDC document, stop it after."""
    base = env["STSCREDS_ISSUER"]
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    app = App(base, process, log)
    try:
        deadline = time.monotonic() + 60
        while True:  # waits for an event (the app listening), never to let time pass
            if process.poll() is not None:
                pytest.fail(f"{command[2:]} exited with {process.returncode}:\n{app.output}")
            try:
                if app.get("/.well-known/openid-configuration").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{command[2:]} did not start:\n{app.output}")
            time.sleep(0.1)
        yield app
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def uvicorn(target: str, port: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", port]


def gunicorn(target: str, port: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", *options, "-b", f"127.0.0.1:{port}", target]


def port_of(env: dict[str, str]) -> str:
    return env["STSCREDS_ISSUER"].rsplit(":", 1)[1]


def sts_tails(strict_sts: StrictSTS, arn: str) -> set[str]:
    return {call.credentials["AccessKeyId"][-4:] for call in strict_sts.requests_for(arn)}


def assert_clean(output: str) -> None:
    """Nothing logged as an error, no traceback, no token."""
    assert "Traceback" not in output
    assert "ERROR" not in output
    assert "eyJ" not in output


# --- FastAPI and Starlette under uvicorn ---------------------------------------------------------


def test_fastapi_app(strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path) -> None:
    command = uvicorn("examples.fastapi_app:app", port_of(example_env))
    with running(command, example_env, tmp_path) as app:
        whoami = app.get_many("/whoami", [{"X-Tenant": "acme"}] * 20)
        objects = app.get("/objects", **{"X-Tenant": "acme"})
        reports = app.get("/reports")
        refused = app.get("/whoami")
    assert {r.status_code for r in whoami} == {200}
    assert {r.json()["access_key_id_tail"] for r in whoami} == sts_tails(strict_sts, ACME_ARN)
    assert objects.json() == {"bucket": "tenant-acme", "keys": OBJECTS["tenant-acme"]}
    assert reports.json() == {"bucket": "reports", "keys": OBJECTS["reports"]}
    assert refused.status_code == 403
    assert strict_sts.calls_for(ACME_ARN) == strict_sts.calls_for(REPORTS_ARN) == 1
    assert strict_sts.jwks_fetches >= 1  # the keys came from the app itself
    assert_clean(app.output)


COUNT_OPEN_SESSIONS_AT_EXIT = """
import atexit, gc, signal, sys

def count_open_sessions():
    import aiohttp
    left = [o for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed]
    print(f"aiohttp sessions left open: {len(left)}", flush=True)

atexit.register(count_open_sessions)
# uvicorn shuts down on SIGTERM, then raises it again for the handler it found: exit normally.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
from uvicorn.main import main
main()
"""


def test_fastapi_app_async_route_with_aiobotocore(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path
) -> None:
    # uvicorn's own command line, plus a count at exit of the aiohttp sessions (one per
    # aiobotocore client used) still open: the lifespan's aio.aclose() must leave none.
    uvicorn_main, *arguments = uvicorn("examples.fastapi_app:app", port_of(example_env))[2:]
    assert uvicorn_main == "uvicorn"
    command = [sys.executable, "-c", COUNT_OPEN_SESSIONS_AT_EXIT, *arguments]
    example_env["PYTHONWARNINGS"] = "always::ResourceWarning"
    tenants = [{"X-Tenant": "acme"}, {"X-Tenant": "beta"}] * 10
    with running(command, example_env, tmp_path) as app:
        listed = app.get_many("/objects-async", tenants)
        blocking = app.get("/objects", **{"X-Tenant": "acme"})  # the sync route still works
        again = app.get("/objects-async", **{"X-Tenant": "acme"})
        refused = app.get("/objects-async")
    assert {r.status_code for r in listed} == {200}
    expected = {
        tenant: {"bucket": f"tenant-{tenant}", "keys": keys, "sizes": [1] * len(keys)}
        for tenant in ("acme", "beta")
        for keys in [OBJECTS[f"tenant-{tenant}"]]
    }
    assert [r.json() for r in listed] == [expected[h["X-Tenant"]] for h in tenants]
    assert again.json() == expected["acme"]
    assert blocking.json() == {"bucket": "tenant-acme", "keys": OBJECTS["tenant-acme"]}
    assert refused.status_code == 403
    assert strict_sts.calls_for(ACME_ARN) == strict_sts.calls_for(BETA_ARN) == 1
    assert "Application shutdown complete" in app.output
    assert "aiohttp sessions left open: 0\n" in app.output
    assert "Unclosed" not in app.output
    assert "ResourceWarning" not in app.output
    assert_clean(app.output)


def test_starlette_app_with_warm_up(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path
) -> None:
    example_env["STSCREDS_WARM_UP"] = "acme"
    command = uvicorn("examples.starlette_app:app", port_of(example_env))
    with running(command, example_env, tmp_path) as app:
        assert strict_sts.wait_for_calls(1)  # the warm-up, before any request for acme
        objects = app.get("/objects", **{"X-Tenant": "acme"})
        beta = app.get("/objects", **{"X-Tenant": "beta"})
        refused = app.get("/objects")
    assert objects.json() == {"bucket": "tenant-acme", "keys": OBJECTS["tenant-acme"]}
    assert beta.json() == {"bucket": "tenant-beta", "keys": OBJECTS["tenant-beta"]}
    assert refused.status_code == 400
    assert strict_sts.calls_for(ACME_ARN) == strict_sts.calls_for(BETA_ARN) == 1
    assert "Application startup complete" in app.output
    assert_clean(app.output)


# --- Flask: the threaded dev server, and gunicorn --preload with threads -----------------------


def test_flask_app_with_flask_run(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "flask", "--app", "examples.flask_app", "run"]
    command += ["--host", "127.0.0.1", "--port", port_of(example_env)]
    with running(command, example_env, tmp_path) as app:
        objects = app.get_many("/objects", [{"X-Tenant": "acme"}] * 10)
        refused = app.get("/objects")
    assert [r.json() for r in objects] == [
        {"bucket": "tenant-acme", "keys": ["a.txt", "b.txt"]}
    ] * 10
    assert refused.status_code == 400
    assert strict_sts.calls == 1
    assert "Traceback" not in app.output


def test_flask_app_under_gunicorn_preload_starts_workers_warm(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path
) -> None:
    # With --preload the warm-up runs in the master before it listens, so STS cannot fetch
    # the keys from the app yet: give them to it directly (as a JWKS hosted elsewhere would).
    key = SigningKey.from_pem(Path(example_env["STSCREDS_KEY_FILE"]).read_bytes())
    strict_sts.configure(jwks={"keys": [key.public_jwk()]})
    example_env["STSCREDS_WARM_UP"] = "acme"
    options = ("--preload", "--workers", "2", "--threads", "8", "--worker-class", "gthread")
    command = gunicorn("examples.flask_app:app", port_of(example_env), *options)
    with running(command, example_env, tmp_path) as app:
        warm = app.get_many("/whoami", [{"X-Tenant": "acme"}] * 30)
        cold = app.get_many("/whoami", [{"X-Tenant": "beta"}] * 30)
        listed = app.get("/objects", **{"X-Tenant": "beta"})
    assert {r.status_code for r in warm + cold} == {200}
    # Every worker served acme from the cache it inherited from the master's warm-up.
    assert strict_sts.calls_for(ACME_ARN) == 1
    assert {r.json()["access_key_id_tail"] for r in warm} == sts_tails(strict_sts, ACME_ARN)
    # A cold tenant: at most one exchange per worker, however many threads asked at once.
    assert 1 <= strict_sts.calls_for(BETA_ARN) <= 2
    assert listed.json() == {"bucket": "tenant-beta", "keys": OBJECTS["tenant-beta"]}
    assert "Traceback" not in app.output


def test_flask_app_signing_with_kms_under_gunicorn_preload(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path
) -> None:
    """STSCREDS_KMS_KEY_ID: every token is signed by moto's KMS, in the master (warm-up) and
    in each forked worker (on a KMS client of its own); the strict STS verifies them all."""
    from servers.kms import LocalKMS

    kms = LocalKMS().start()
    try:
        arn = kms.create_signing_key("ECC_NIST_P256", "us-east-1")
        public = SigningKey.from_kms(
            arn, region="us-east-1", endpoint_url=kms.url, session=kms.session()
        )
        strict_sts.configure(jwks={"keys": [public.public_jwk()]})
        env = {
            **{k: v for k, v in example_env.items() if not k.startswith("AWS_")},
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "STSCREDS_KMS_KEY_ID": arn,
            "STSCREDS_KMS_ENDPOINT": kms.url,
            "STSCREDS_WARM_UP": "acme",
        }
        env.pop("STSCREDS_KEY_FILE")
        options = ("--preload", "--workers", "2", "--threads", "8", "--worker-class", "gthread")
        command = gunicorn("examples.flask_app:app", port_of(env), *options)
        with running(command, env, tmp_path) as app:
            warm = app.get_many("/whoami", [{"X-Tenant": "acme"}] * 10)
            cold = app.get_many("/whoami", [{"X-Tenant": "beta"}] * 10)
            jwks = app.get("/.well-known/jwks.json").json()
    finally:
        kms.stop()
    assert {r.status_code for r in warm + cold} == {200}
    assert jwks == {"keys": [public.public_jwk()]}
    calls = strict_sts.requests_for(ACME_ARN) + strict_sts.requests_for(BETA_ARN)
    assert {call.token_header["kid"] for call in calls} == {public.kid}
    assert kms.calls["Sign"] == len(calls)  # one signature per exchange, none per request
    assert "Traceback" not in app.output


# --- Django: ASGI under uvicorn, WSGI under gunicorn with threads -------------------------------


def django_tenants(env: dict[str, str]) -> None:
    """``manage.py migrate`` and ``add_tenant``, as the example's README says."""
    manage = [sys.executable, "examples/django_project/manage.py"]
    for args in (
        ["migrate", "--verbosity", "0"],
        ["add_tenant", "alice", ACME_ARN, "tenant-acme"],
        ["add_tenant", "bob", BETA_ARN, "tenant-beta"],
    ):
        subprocess.run(manage + args, cwd=ROOT, env=env, check=True, capture_output=True)


@pytest.mark.parametrize("server", ["asgi-uvicorn", "wsgi-gunicorn"])
def test_django_project(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path, server: str
) -> None:
    django_tenants(example_env)
    example_env["STSCREDS_WARM_UP"] = ACME_ARN
    port = port_of(example_env)
    if server == "asgi-uvicorn":
        command = uvicorn("examples.django_project.asgi:application", port)
    else:
        options = ("--workers", "1", "--threads", "8", "--worker-class", "gthread")
        command = gunicorn("examples.django_project.wsgi:application", port, *options)
    with running(command, example_env, tmp_path) as app:
        assert strict_sts.wait_for_calls(1)  # the warm-up
        alice = app.get_many("/whoami", [{"X-User": "alice"}] * 20)
        objects = app.get("/objects", **{"X-User": "bob"})
        nobody = app.get("/whoami", **{"X-User": "mallory"})
    assert {r.status_code for r in alice} == {200}
    assert {r.json()["access_key_id_tail"] for r in alice} == sts_tails(strict_sts, ACME_ARN)
    assert strict_sts.calls_for(ACME_ARN) == 1
    assert objects.json() == {"bucket": "tenant-beta", "keys": OBJECTS["tenant-beta"]}
    assert nobody.status_code == 403
    assert "lifespan" not in app.output.lower()
    assert_clean(app.output)


# --- /metrics: the broker's figures in Prometheus' text format, on every example ---------------


def prometheus_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


METRICS_EXAMPLES = {
    "starlette-uvicorn": (["uvicorn", "examples.starlette_app:app"], "X-Tenant", "acme"),
    "fastapi-uvicorn": (["uvicorn", "examples.fastapi_app:app"], "X-Tenant", "acme"),
    "flask-run": (["flask", "examples.flask_app"], "X-Tenant", "acme"),
    "django-asgi-uvicorn": (
        ["uvicorn", "examples.django_project.asgi:application"],
        "X-User",
        "alice",
    ),
    "django-wsgi-gunicorn": (
        ["gunicorn", "examples.django_project.wsgi:application"],
        "X-User",
        "alice",
    ),
}


@pytest.mark.parametrize("example", list(METRICS_EXAMPLES))
def test_metrics_endpoint(
    strict_sts: StrictSTS, example_env: dict[str, str], tmp_path: Path, example: str
) -> None:
    (server, target), header, user = METRICS_EXAMPLES[example]
    port = port_of(example_env)
    if server == "uvicorn":
        command = uvicorn(target, port)
    elif server == "gunicorn":
        command = gunicorn(target, port, "--workers", "1", "--threads", "4")
    else:
        command = [sys.executable, "-m", "flask", "--app", target, "run"]
        command += ["--host", "127.0.0.1", "--port", port]
    if target.startswith("examples.django_project"):
        django_tenants(example_env)
    with running(command, example_env, tmp_path) as app:
        before = app.get("/metrics")
        first = app.get("/whoami", **{header: user})  # a miss: one exchange
        second = app.get("/whoami", **{header: user})  # a hit
        after = app.get("/metrics")
    assert first.status_code == second.status_code == 200
    assert strict_sts.calls_for(ACME_ARN) == 1
    assert before.status_code == after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    # Before any credentialed request: the series exist, at zero.
    assert prometheus_samples(before.text)[("stscreds_l1_hits_total", frozenset())] == 0
    assert "stscreds_exchanges_total{" not in before.text
    samples = prometheus_samples(after.text)
    assert samples[("stscreds_l1_hits_total", frozenset())] >= 1
    assert samples[("stscreds_misses_total", frozenset())] == 1
    success = frozenset({"trigger": "request", "outcome": "success", "code": ""}.items())
    assert samples[("stscreds_exchanges_total", success)] == 1
    assert samples[("stscreds_cached_identities", frozenset())] == 1
    assert samples[("stscreds_request_wait_seconds_count", frozenset())] == 1
    assert "eyJ" not in after.text
    assert_clean(app.output)
