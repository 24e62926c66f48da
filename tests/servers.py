"""Real servers for the tests: redis-server and ``gateway run`` on free ports."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class ServerProcess:
    """A server of the tests' own, as a subprocess on ``self.port``."""

    port: int
    proc: subprocess.Popen | None = None

    def _spawn(self, command: list[str], *, stderr=subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for_port(self.port)

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class RedisServer(ServerProcess):
    """A private redis-server (no persistence) that a test may stop and restart."""

    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir)])

    def restart(self, downtime: float = 0.5) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()


class Mosquitto(ServerProcess):
    """A private mosquitto (with persistence, so a restart keeps sessions and queues)."""

    def __init__(self, workdir: Path, *, extra_config: str = ""):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.workdir = workdir / f"mosquitto-{self.port}"
        self.workdir.mkdir(parents=True)
        self.config = self.workdir / "mosquitto.conf"
        self.config.write_text(
            # Started as root, mosquitto would switch to a 'mosquitto' user that cannot write
            # its database here; as anyone else, this line changes nothing.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"persistence true\npersistence_location {self.workdir}/\n"
            + (extra_config or "allow_anonymous true\n")
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        # stop() sends SIGTERM, on which mosquitto saves its persistence file.
        with open(self.workdir / "log", "ab") as log:
            self._spawn([self.binary, "-c", str(self.config)], stderr=log)


class Nginx(ServerProcess):
    """Debian's nginx running ``deploy/nginx/gateway.conf`` in front of local replicas.

    The config is the deployed one with only its addresses changed: the upstream servers
    (``gateway-N:8000`` in compose) become the replicas' loopback ports, ``listen 80`` a free
    port; a minimal main config around it keeps pid, logs and temp files in ``workdir``.
    """

    SITE = ROOT / "deploy" / "nginx" / "gateway.conf"

    def __init__(self, workdir: Path, upstream_ports: list[int]):
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(self.binary).exists():
            raise RuntimeError("nginx is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.workdir = workdir / f"nginx-{self.port}"
        self.workdir.mkdir(parents=True)
        self.workdir.chmod(0o777)  # its workers may run as another user
        site = self.SITE.read_text()
        servers = iter(upstream_ports)
        site = re.sub(r"server gateway-\d+:8000", lambda _: f"server 127.0.0.1:{next(servers)}",
                      site)
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (self.workdir / "gateway.conf").write_text(site)
        temp = "\n".join(f"    {kind}_temp_path {self.workdir}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config = self.workdir / "nginx.conf"
        self.config.write_text(
            f"worker_processes 1;\npid {self.workdir}/nginx.pid;\n"
            f"error_log {self.workdir}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n    access_log off;\n{temp}\n    include {self.workdir}/gateway.conf;\n}}\n"
        )
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def test_config(self) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-t", "-p", str(self.workdir), "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        self._spawn([self.binary, "-p", str(self.workdir), "-c", str(self.config),
                     "-g", "daemon off;"])


class Gateway:
    """``gateway run`` in a subprocess, on a free port, with its own data directory."""

    def __init__(
        self, datadir: Path, *, env: dict[str, str] | None = None, port: int | None = None
    ):
        self.datadir = datadir
        self.port = port or free_port()
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")
        }
        self.env = {
            **inherited,
            "GATEWAY_DATA_DIR": str(datadir),
            "DJANGO_SETTINGS_MODULE": "settings",
            "PYTHONUNBUFFERED": "1",
            "MQTT_ENABLED": "0",  # tests that want MQTT say so (and never use port 1883)
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = datadir / f"gateway-{self.port}.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.http

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self) -> Gateway:
        self.datadir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"gateway did not start:\n{self.stuck()}")

    def stuck(self) -> str:
        """The log with the stacks of every thread (``gateway run`` dumps them on SIGUSR1),
        the machine's load and its busiest processes: what a hung start was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
        busiest = subprocess.run(["ps", "-eo", "pid,stat,pcpu,rss,etime,args", "--sort=-pcpu"],
                                 capture_output=True, text=True).stdout.splitlines()[:12]
        return "\n".join([self.log(), f"load average: {os.getloadavg()}", *busiest])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        """``gateway manage ...`` against this gateway's database; its output."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "manage", *args],
            cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"gateway manage {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def create_user(self, username: str, password: str, *, staff: bool) -> None:
        self.manage("shell", "-c", (
            "from django.contrib.auth.models import User; "
            f"User.objects.create_user({username!r}, password={password!r}, "
            f"is_staff={staff}, is_superuser={staff})"
        ))

    def login(self, username: str, password: str) -> str:
        """Log in through the login form, as a browser does; the Cookie header to use."""
        import http.cookiejar
        import re
        import urllib.parse

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(self.http + "/accounts/login/", timeout=10) as page:
            form = page.read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
        assert token is not None, form
        body = urllib.parse.urlencode({
            "username": username, "password": password, "csrfmiddlewaretoken": token[1],
        }).encode()
        request = urllib.request.Request(
            self.http + "/accounts/login/", data=body, headers={"Referer": self.http + "/"}
        )
        with opener.open(request, timeout=10):
            pass
        cookies = {cookie.name: cookie.value for cookie in jar}
        assert "sessionid" in cookies, "login failed"
        return "; ".join(f"{name}={value}" for name, value in cookies.items())

    def get_json(self, path: str) -> dict:
        import json

        with urllib.request.urlopen(self.http + path, timeout=5) as resp:
            return json.loads(resp.read())
