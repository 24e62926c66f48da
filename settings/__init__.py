"""Django settings for the gateway, read from environment variables only here.

Every variable is documented with its default in ``env.example``. Development mode
(``DJANGO_DEBUG=1``, the default) runs on embedded defaults; production mode
(``DJANGO_DEBUG=0``) has no default secret and refuses a wildcard host.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


# --- Core --------------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", True)
DATA_DIR = Path(env_str("GATEWAY_DATA_DIR", str(BASE_DIR)))

if DEBUG:
    SECRET_KEY = env_str("DJANGO_SECRET_KEY", "dev-only-insecure-key-do-not-use-in-production")
    ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
else:
    SECRET_KEY = env_str("DJANGO_SECRET_KEY")
    if not SECRET_KEY:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG=0")
    # The rule of `manage.py check --deploy` (security.W009), refused rather than warned.
    if (len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5
            or SECRET_KEY.startswith("django-insecure-")):
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be at least 50 characters with at least 5 different ones "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "")
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS is required when DJANGO_DEBUG=0")
    if "*" in ALLOWED_HOSTS:
        raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS='*' is refused in production")

CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")
# The session cookie never rides on a cross-site request (Django's default, stated here).
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
# Error pages never show credentials: settings named like secrets and the passwords inside
# URLs (MQTT_URL, REDIS_URL, DATABASE_URL) are masked.
DEFAULT_EXCEPTION_REPORTER_FILTER = "gateway.debug.GatewayExceptionReporterFilter"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "gateway",
]

MIDDLEWARE = [
    # First: probes answer whatever the Host (pods are probed by IP).
    "gateway.middleware.ProbeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway.urls"
ASGI_APPLICATION = "gateway.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------

_SQLITE_OPTIONS = {
    # IMMEDIATE takes the write lock at BEGIN, so two writers never deadlock on an upgrade;
    # WAL lets history reads run while a message is being written.
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}

# Connections are kept (CONN_MAX_AGE; network databases are health-checked): channels'
# database_sync_to_async closes expired connections around every call, so a zero age would
# reconnect for every message.
_CONN_MAX_AGE = env_int("DATABASE_CONN_MAX_AGE", 600)

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL, conn_max_age=_CONN_MAX_AGE, conn_health_checks=True
        )
    }
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        # A local file needs no health check (which would cost a query per message).
        DATABASES["default"].update({"OPTIONS": dict(_SQLITE_OPTIONS),
                                     "CONN_HEALTH_CHECKS": False})
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(DATA_DIR / "gateway.sqlite3"),
            "OPTIONS": dict(_SQLITE_OPTIONS),
            "CONN_MAX_AGE": _CONN_MAX_AGE,
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "index"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
# Serve app static files straight from the packages, so no collectstatic step is needed.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- Channel layer -----------------------------------------------------------------------

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    # One PUBLISH per room message. Delivery guarantees come from the stored, per-room
    # message ids (gateway/fanout.py fills any gap from the database), not from the layer.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": env_str("GATEWAY_REDIS_PREFIX", "gateway"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # One channel per process receives every room it serves (gateway/fanout.py),
            # so the per-channel queue must hold a burst, not one consumer's share.
            "CONFIG": {"capacity": 10_000},
        }
    }

# --- Gateway -----------------------------------------------------------------------------

# The protocol adapters (gateway/adapters.py): a protocol's name and the class that brings
# its routes, consumers, server, checks and options. Adding a protocol is a folder under
# protocols/ and a line here ("How to add a protocol" in docs/architecture.md).
GATEWAY_ADAPTERS = {
    "web": "protocols.web.adapter.WebAdapter",  # pages, API, chat and dashboard sockets
    "sse": "protocols.sse.adapter.SseAdapter",  # GET /sse/rooms/<room>/, an event stream
    "mqtt": "protocols.mqtt.adapter.MqttAdapter",  # devices, through a broker
    "telegram": "protocols.telegram.adapter.TelegramAdapter",  # the bot, with a token
    "webhook": "protocols.webhook.adapter.WebhookAdapter",  # room events POSTed to registered URLs
}
PROTOCOL_NAMES = tuple(GATEWAY_ADAPTERS)
# The ones this process runs (`gateway run --protocols` sets it; default all). Without web,
# the HTTP server still answers /healthz, /readyz and /metrics, and the routes of the others
# (the event stream with sse, Telegram's webhook with telegram).
GATEWAY_PROTOCOLS = env_list("GATEWAY_PROTOCOLS", ",".join(PROTOCOL_NAMES))

GATEWAY = {
    # One limit for every protocol, in characters.
    "MAX_MESSAGE_LENGTH": env_int("GATEWAY_MAX_MESSAGE_LENGTH", 4096, minimum=1),
    # Different emoji one message may carry as reactions (one more is refused).
    "MAX_REACTIONS": env_int("GATEWAY_MAX_REACTIONS", 20, minimum=1),
    # WebSocket frames above this many bytes are refused by the server (close code 1009).
    "WS_MAX_FRAME_BYTES": env_int("GATEWAY_WS_MAX_FRAME_BYTES", 65_536, minimum=1024),
    # A socket whose unsent backlog passes this many bytes has fallen behind: it is closed
    # with code 4008 and resumes from history when it reconnects.
    "WS_SEND_BUFFER_LIMIT": env_int("GATEWAY_WS_SEND_BUFFER_LIMIT", 1_048_576, minimum=65_536),
    # Token bucket per connection: sustained messages per second and burst size.
    "RATE_LIMIT_PER_SECOND": env_float("GATEWAY_RATE_LIMIT_PER_SECOND", 5.0, minimum=0.01),
    "RATE_LIMIT_BURST": env_int("GATEWAY_RATE_LIMIT_BURST", 20, minimum=1),
    "REQUIRE_LOGIN": env_bool("GATEWAY_REQUIRE_LOGIN", False),
    "HISTORY_PAGE_SIZE": env_int("GATEWAY_HISTORY_PAGE_SIZE", 50, minimum=1),
    "HISTORY_MAX_PAGE_SIZE": env_int("GATEWAY_HISTORY_MAX_PAGE_SIZE", 500, minimum=1),
    # A process whose heartbeat is older than this is dead: its members are not shown.
    "PRESENCE_TIMEOUT": env_float("GATEWAY_PRESENCE_TIMEOUT", 15.0, minimum=1.0),
    "HEARTBEAT_INTERVAL": env_float("GATEWAY_HEARTBEAT_INTERVAL", 5.0, minimum=0.1),
    # How often each process compares its rooms with the database to fill any gap.
    "RESYNC_INTERVAL": env_float("GATEWAY_RESYNC_INTERVAL", 2.0, minimum=0.1),
    # Origins (scheme://host[:port]) besides the site's own that may open its WebSockets and
    # streams with the visitor's cookies. Default: none (same origin only).
    "ALLOWED_ORIGINS": env_list("GATEWAY_ALLOWED_ORIGINS", ""),
    # Refused frames (bad JSON, binary, unknown type, over the rate) a socket may send in a
    # burst; they refill at one per second. Past it the socket is closed with 1008.
    "WS_ERROR_LIMIT": env_int("GATEWAY_WS_ERROR_LIMIT", 20, minimum=1),
    # Rooms: at most this many exist (0: no cap); each sender may create this many per
    # minute; with ROOMS_STAFF_ONLY only staff (admin, dashboard) create rooms.
    "MAX_ROOMS": env_int("GATEWAY_MAX_ROOMS", 10_000, minimum=0),
    "ROOM_CREATE_PER_MINUTE": env_float("GATEWAY_ROOM_CREATE_PER_MINUTE", 10.0, minimum=0.01),
    "ROOMS_STAFF_ONLY": env_bool("GATEWAY_ROOMS_STAFF_ONLY", False),
    # HTTP: a request must send its headers within HEADER_TIMEOUT seconds of the connection
    # (or of the previous response); an idle keep-alive connection closes after IDLE_TIMEOUT.
    "HTTP_HEADER_TIMEOUT": env_float("GATEWAY_HTTP_HEADER_TIMEOUT", 10.0, minimum=0.5),
    "HTTP_IDLE_TIMEOUT": env_float("GATEWAY_HTTP_IDLE_TIMEOUT", 60.0, minimum=1.0),
    # A WebSocket handshake must complete (and the application accept it) within this.
    "WS_HANDSHAKE_TIMEOUT": env_float("GATEWAY_WS_HANDSHAKE_TIMEOUT", 10.0, minimum=0.5),
    # The server pings an open socket every PING_INTERVAL seconds (keep-alive through
    # proxies, and dead peers found) and closes it if the pong is PING_TIMEOUT late. Idle
    # sockets cost CPU in proportion (docs: README "Performance").
    "WS_PING_INTERVAL": env_float("GATEWAY_WS_PING_INTERVAL", 20.0, minimum=1.0),
    "WS_PING_TIMEOUT": env_float("GATEWAY_WS_PING_TIMEOUT", 30.0, minimum=1.0),
    # The HTTP API: each key's flood limit (a token bucket per key and process), and the
    # largest JSON body it takes (413 beyond).
    "API_RATE_LIMIT_PER_SECOND": env_float("GATEWAY_API_RATE_LIMIT_PER_SECOND", 50.0,
                                           minimum=0.01),
    "API_RATE_LIMIT_BURST": env_int("GATEWAY_API_RATE_LIMIT_BURST", 100, minimum=1),
    "API_MAX_BODY_BYTES": env_int("GATEWAY_API_MAX_BODY_BYTES", 65_536, minimum=1024),
    # Retention, for rooms whose policy does not say (empty: forever): messages older than
    # this many days, and beyond the newest this many per room, are pruned by a periodic job
    # (one replica at a time), every RETENTION_INTERVAL seconds.
    "RETENTION_DAYS": env_int("GATEWAY_RETENTION_DAYS", 0, minimum=0) or None,
    "RETENTION_MESSAGES": env_int("GATEWAY_RETENTION_MESSAGES", 0, minimum=0) or None,
    "RETENTION_INTERVAL": env_float("GATEWAY_RETENTION_INTERVAL", 300.0, minimum=0.1),
    # Attachments (gateway/files.py): the largest file, the most bytes and files in one
    # message, the content types taken (read from the bytes; patterns like image/*), the
    # most pixels an image may have (a decompression bomb is refused before it is decoded),
    # and how long a file's signed URL stays valid, in seconds.
    "FILE_MAX_BYTES": env_int("GATEWAY_FILE_MAX_BYTES", 25 * 1024 * 1024, minimum=1024),
    "FILE_MAX_MESSAGE_BYTES": env_int("GATEWAY_FILE_MAX_MESSAGE_BYTES", 50 * 1024 * 1024,
                                      minimum=1024),
    "FILE_MAX_COUNT": env_int("GATEWAY_FILE_MAX_COUNT", 10, minimum=1),
    "FILE_TYPES": env_list(
        "GATEWAY_FILE_TYPES",
        "image/jpeg,image/png,image/gif,image/webp,application/pdf,text/plain,"
        "audio/mpeg,audio/ogg,audio/mp4,audio/aac,audio/x-wav,audio/x-flac,"
        "video/mp4,video/webm,video/quicktime",
    ),
    "FILE_MAX_PIXELS": env_int("GATEWAY_FILE_MAX_PIXELS", 50_000_000, minimum=1),
    "FILE_URL_TTL": env_int("GATEWAY_FILE_URL_TTL", 86_400, minimum=60),
    # The gateway's address as others reach it (https://chat.example.com): file URLs given
    # to devices, webhooks and chats are absolute with it. Empty: paths only (/files/...).
    "PUBLIC_URL": env_str("GATEWAY_PUBLIC_URL").rstrip("/"),
}

# Where attachments are kept: any Django storage. Default: files under the data dir
# (GATEWAY_FILE_STORAGE_DIR); GATEWAY_FILE_STORAGE_BACKEND names another class (for example
# storages.backends.s3.S3Storage from django-storages) and GATEWAY_FILE_STORAGE_OPTIONS its
# options as a JSON object. The gateway always serves the files itself (/files/...), behind
# its own signed, expiring URLs, so the storage need not be public.
_FILE_STORAGE_OPTIONS = env_str("GATEWAY_FILE_STORAGE_OPTIONS")
try:
    _file_storage_options = json.loads(_FILE_STORAGE_OPTIONS) if _FILE_STORAGE_OPTIONS else {}
except ValueError:
    raise ImproperlyConfigured("GATEWAY_FILE_STORAGE_OPTIONS must be a JSON object") from None
if not isinstance(_file_storage_options, dict):
    raise ImproperlyConfigured("GATEWAY_FILE_STORAGE_OPTIONS must be a JSON object")
_FILE_STORAGE_BACKEND = (env_str("GATEWAY_FILE_STORAGE_BACKEND")
                         or "django.core.files.storage.FileSystemStorage")
if _FILE_STORAGE_BACKEND == "django.core.files.storage.FileSystemStorage":
    _file_storage_options = {
        "location": env_str("GATEWAY_FILE_STORAGE_DIR") or str(DATA_DIR / "attachments"),
        "base_url": None, "file_permissions_mode": 0o640, "directory_permissions_mode": 0o750,
        **_file_storage_options,
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "attachments": {"BACKEND": _FILE_STORAGE_BACKEND, "OPTIONS": _file_storage_options},
}

# --- Connect tokens (JWT) -----------------------------------------------------------------

# Another backend's users join rooms under their own names with a token it mints: a JWT
# with ``sub``, ``name``, ``exp`` and optionally ``rooms`` (names or patterns). Off until one
# of the keys is set: an HS256 secret, or a public key (PEM, inline or a file's path) or a
# JWKS URL for RS256/ES256. Secrets: never in the repository.
_JWT_SECRET = env_str("GATEWAY_JWT_SECRET")
_JWT_PUBLIC_KEY = env_str("GATEWAY_JWT_PUBLIC_KEY")
if _JWT_SECRET and len(_JWT_SECRET) < 32:
    raise ImproperlyConfigured("GATEWAY_JWT_SECRET must be at least 32 characters (RFC 7518 "
                               "asks HS256 keys as long as the hash: 256 bits)")
if _JWT_PUBLIC_KEY and not _JWT_PUBLIC_KEY.startswith("-----BEGIN"):
    try:
        _JWT_PUBLIC_KEY = Path(_JWT_PUBLIC_KEY).read_text()
    except OSError as exc:
        raise ImproperlyConfigured(f"GATEWAY_JWT_PUBLIC_KEY: cannot read {exc.filename}: "
                                   f"{exc.strerror}") from None
JWT = {
    "SECRET": _JWT_SECRET,
    "PUBLIC_KEY": _JWT_PUBLIC_KEY,
    "JWKS_URL": env_str("GATEWAY_JWT_JWKS_URL"),
    # Checked when set: the token's ``iss`` and ``aud`` must be these.
    "ISSUER": env_str("GATEWAY_JWT_ISSUER"),
    "AUDIENCE": env_str("GATEWAY_JWT_AUDIENCE"),
    # Seconds of clock difference allowed on ``exp`` (and ``nbf``, ``iat``).
    "LEEWAY": env_float("GATEWAY_JWT_LEEWAY", 10.0, minimum=0.0),
}

# --- Webhooks -----------------------------------------------------------------------------

WEBHOOK = {
    # Seconds a receiver has to answer a delivery (then it is retried, with backoff).
    "TIMEOUT": env_float("GATEWAY_WEBHOOK_TIMEOUT", 10.0, minimum=0.1),
    # A webhook failing for longer than this (seconds) is paused, and shown as failing in the
    # dashboard and the admin; enabled again, it resumes where it stopped.
    "PAUSE_AFTER": env_float("GATEWAY_WEBHOOK_PAUSE_AFTER", 86_400.0, minimum=1.0),
    # Deliver to receivers on this machine or a private network (loopback, 10/8, 172.16/12,
    # 192.168/16, 100.64/10, fc00::/7): off, so that a webhook cannot reach what only the
    # gateway can (link-local addresses, the cloud's metadata service, are never allowed).
    "ALLOW_PRIVATE": env_bool("GATEWAY_WEBHOOK_ALLOW_PRIVATE", False),
}

# --- MQTT --------------------------------------------------------------------------------

# Empty: `gateway run` starts an embedded broker (amqtt) on 127.0.0.1:MQTT_EMBEDDED_PORT.
# Otherwise mqtt://user:pass@host:1883 or mqtts://... (TLS) for a broker of your own.
MQTT_URL = env_str("MQTT_URL")
MQTT = {
    "ENABLED": env_bool("MQTT_ENABLED", True),
    "URL": MQTT_URL,
    "EMBEDDED_PORT": env_int("MQTT_EMBEDDED_PORT", 1883, minimum=0),
    "TOPIC_PREFIX": env_str("MQTT_TOPIC_PREFIX", "rooms"),
    # Fixed, so the broker keeps the gateway's session (clean session off) across restarts;
    # unique per process. Default: rt-gateway-<hostname>-<HTTP port>.
    "CLIENT_ID": env_str("MQTT_CLIENT_ID"),
    # Set (for example to "gateway") when several gateway processes share one broker: they
    # then subscribe as $share/<group>/..., so each device message reaches one of them.
    "SHARED_GROUP": env_str("MQTT_SHARED_GROUP"),
    # A device's scope closes after this many seconds without a message.
    "IDLE_TIMEOUT": env_float("MQTT_IDLE_TIMEOUT", 300.0, minimum=1.0),
    "KEEPALIVE": env_int("MQTT_KEEPALIVE", 30, minimum=5),
    # Devices as members: a device whose status is online and that has published nothing
    # (status, state, messages) for this many seconds is shown as unknown (a device that
    # died without a will). 0: never.
    "DEVICE_SILENCE": env_float("MQTT_DEVICE_SILENCE", 0.0, minimum=0.0),
    # Seconds a command waits for its device's answer when it names no timeout of its own;
    # then the room is told it timed out.
    "COMMAND_TIMEOUT": env_float("MQTT_COMMAND_TIMEOUT", 10.0, minimum=0.5),
    # The gateway's client speaks MQTT "5" (the default with MQTT_URL) or "3.1.1" to
    # MQTT_URL's broker; with 5, devices' MQTT 5 properties reach it (a file's content type
    # and name, a command's correlation data) and it sets its own (response topic and
    # correlation data on commands, user properties on out). Devices may speak either. The
    # embedded broker speaks 3.1.1 only.
    "PROTOCOL": env_str("MQTT_PROTOCOL", "5" if MQTT_URL else "3.1.1"),
    # The embedded broker: its address (loopback by default; production warns otherwise),
    # its largest packet in bytes, and who may connect. MQTT_DEVICE_PASSWORDS names a file
    # made by mosquitto_passwd (the same file deploy/mosquitto uses): a device logs in with
    # its device id as user name and may publish only as itself. Anonymous devices are
    # refused when MQTT_ALLOW_ANONYMOUS is off, which is its default in production mode,
    # with GATEWAY_REQUIRE_LOGIN=1 and once device passwords are configured.
    "EMBEDDED_HOST": env_str("MQTT_EMBEDDED_HOST", "127.0.0.1"),
    "MAX_PACKET_SIZE": env_int("MQTT_MAX_PACKET_SIZE", 262_144, minimum=1024),
    "DEVICE_PASSWORDS": env_str("MQTT_DEVICE_PASSWORDS"),
    "ALLOW_ANONYMOUS": env_bool(
        "MQTT_ALLOW_ANONYMOUS",
        DEBUG and not env_bool("GATEWAY_REQUIRE_LOGIN", False)
        and not env_str("MQTT_DEVICE_PASSWORDS"),
    ),
}

# --- Telegram ----------------------------------------------------------------------------

# The bot runs only when a token is set (from @BotFather). Never commit it: it is a secret,
# and it is masked in every log line.
TELEGRAM_BOT_TOKEN = env_str("TELEGRAM_BOT_TOKEN")
TELEGRAM = {
    "TOKEN": TELEGRAM_BOT_TOKEN,
    # Another Bot API server (a self-hosted one, or a test stand-in).
    "API_URL": env_str("TELEGRAM_API_URL", "https://api.telegram.org").rstrip("/"),
    # Set (https://your.host/telegram/webhook/) to receive updates by webhook on this server's
    # route /telegram/webhook/ instead of polling.
    "WEBHOOK_URL": env_str("TELEGRAM_WEBHOOK_URL"),
    # The secret Telegram sends with each webhook call; default derived from the token, so
    # every replica agrees. 1-256 of A-Z a-z 0-9 _ -.
    "WEBHOOK_SECRET": env_str("TELEGRAM_WEBHOOK_SECRET") or (
        hashlib.sha256(f"telegram-webhook:{TELEGRAM_BOT_TOKEN}".encode()).hexdigest()
        if TELEGRAM_BOT_TOKEN else ""
    ),
    "POLL_TIMEOUT": env_int("TELEGRAM_POLL_TIMEOUT", 30, minimum=0),
    # A chat's scope closes after this many seconds without a message (its room stays).
    "IDLE_TIMEOUT": env_float("TELEGRAM_IDLE_TIMEOUT", 300.0, minimum=1.0),
    # Telegram's flood limits: messages per second to one chat, per minute to one group,
    # per second in all.
    "CHAT_RATE": env_float("TELEGRAM_CHAT_RATE", 1.0, minimum=0.01),
    "GROUP_RATE": env_float("TELEGRAM_GROUP_RATE", 20.0, minimum=0.1),
    "OVERALL_RATE": env_float("TELEGRAM_OVERALL_RATE", 30.0, minimum=0.1),
    # Room messages waiting for one chat before the oldest are skipped (the chat is told).
    "CHAT_BACKLOG": env_int("TELEGRAM_CHAT_BACKLOG", 100, minimum=1),
}

# --- Production hardening (manage.py check --deploy is clean with the defaults) ----------

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", True)

# --- Logging -----------------------------------------------------------------------------

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        # Secrets are masked in every line: python-telegram-bot and httpx log URLs that
        # contain the bot token.
        "structured": {
            "()": "gateway.logging.StructuredFormatter",
            "secrets": [TELEGRAM_BOT_TOKEN, TELEGRAM["WEBHOOK_SECRET"], JWT["SECRET"]],
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "structured"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Only through the root handler: in DEBUG, Django's own console handler would print
        # its warnings a second time, unstructured.
        "django": {"level": "INFO"},
        # daphne logs every HTTP request at INFO through its access log; keep it at WARNING.
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # The embedded broker logs every packet and state change at INFO.
        "amqtt": {"level": "WARNING"},
        "transitions": {"level": "WARNING"},
        # httpx logs every Bot API request (each long poll) at INFO.
        "httpx": {"level": "DEBUG" if LOG_LEVEL == "DEBUG" else "WARNING"},
    },
}
