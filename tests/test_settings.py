"""Production mode: no default secret, no wildcard host, and a clean deploy check."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.servers import ROOT

PROD = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "k" * 60 + "-not-a-real-secret-0123456789",
        "DJANGO_ALLOWED_HOSTS": "chat.example.com"}


def manage(*args: str, env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "REDIS_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "manage", *args],
        cwd=ROOT, env={**base, "GATEWAY_DATA_DIR": str(tmp_path), **env},
        capture_output=True, text=True, timeout=60,
    )


def test_production_without_a_secret_is_refused(tmp_path):
    env = {k: v for k, v in PROD.items() if k != "DJANGO_SECRET_KEY"}
    result = manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


def test_production_refuses_a_weak_secret(tmp_path):
    for weak in ("x", "short-but-varied-0123456789", "a" * 80, "abab" * 20,
                 "django-insecure-" + "0123456789abcdefghij" * 3):
        result = manage("check", env={**PROD, "DJANGO_SECRET_KEY": weak}, tmp_path=tmp_path)
        assert result.returncode != 0, weak
        assert "at least 50 characters" in result.stderr


def test_production_refuses_a_wildcard_host(tmp_path):
    result = manage("check", env={**PROD, "DJANGO_ALLOWED_HOSTS": "*"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "refused in production" in result.stderr


def test_deploy_check_is_clean_in_production(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PROD, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_bad_numbers_in_the_environment_are_explained(tmp_path):
    result = manage("check", env={"GATEWAY_MAX_MESSAGE_LENGTH": "lots"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "GATEWAY_MAX_MESSAGE_LENGTH='lots' is not an integer" in result.stderr


def test_gateway_manage_reaches_createsuperuser(tmp_path):
    env = {"DJANGO_SUPERUSER_PASSWORD": "a-long-pass-phrase-1",
           "DJANGO_SUPERUSER_EMAIL": "root@example.com"}
    assert manage("migrate", "-v0", env=env, tmp_path=tmp_path).returncode == 0
    result = manage("createsuperuser", "--noinput", "--username", "root", env=env,
                    tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    shell = manage("shell", "-v0", "-c",
                   "from django.contrib.auth.models import User;"
                   "print(User.objects.get(username='root').is_superuser)",
                   env=env, tmp_path=tmp_path)
    assert shell.stdout.strip() == "True"
