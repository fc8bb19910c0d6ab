"""ChatStream settings: one module for every role, read from the environment.

Every variable is documented with its default in ``.env.example``. ``.env`` at the project root is read
first (real environment variables win), so ``make run`` works with the file bootstrap writes.
Over 400 lines because it is one flat list of settings, each with why its default was chosen; one module is
what Django reads and what tests/cluster/test_env.py checks against ``.env.example``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import dj_database_url

from chatstream_site.env import (
    ConfigError,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
    env_url,
    load_dotenv,
)
from core.keys import CACHE_PREFIX, CELERY_PREFIX, CHANNELS_PREFIX

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# CHATSTREAM_DOTENV names another file; set it empty to read none (the test suite does).
_dotenv = os.environ.get("CHATSTREAM_DOTENV", str(BASE_DIR / ".env"))
if _dotenv:
    load_dotenv(Path(_dotenv))

DEBUG = env_bool("DEBUG", False)
if DEBUG:
    SECRET_KEY = env_str("SECRET_KEY", "insecure-dev-only-key-do-not-use-in-production")
else:
    SECRET_KEY = env_str("SECRET_KEY", required=True)
    if len(SECRET_KEY) < 32:
        raise ConfigError("SECRET_KEY is too short: use at least 32 random characters outside DEBUG")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
# The hosts a WebSocket handshake's Origin may name (gateway and brokers): ALLOWED_HOSTS without the "*"
# wildcard. A wildcard host list (often set to get past Host checks behind a proxy) must not also switch the
# cross-site WebSocket check off: with "*" only the named hosts and CHATSTREAM_GATEWAY_ALLOWED_ORIGINS pass.
WS_ORIGIN_HOSTS = [host for host in ALLOWED_HOSTS if host != "*"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "chatstream_site",
    "storage",
    "messaging",
    "api",
    "gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "chatstream_site.security.SecureCookiesOverTlsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The gateway replaces any client-sent X-Forwarded-Proto with the scheme it was reached by: "https" marks a
# request served over TLS (Secure cookies, chatstream_site/security.py; HSTS is the gateway's).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

ROOT_URLCONF = "chatstream_site.urls"
ASGI_APPLICATION = "chatstream_site.asgi.application"

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

# Django's own tables only (staff accounts, sessions): SQLite by default, PostgreSQL by URL.
DATABASE_URL = env_url(
    "DATABASE_URL",
    f"sqlite:///{BASE_DIR / 'var' / 'django.sqlite3'}",
    schemes=("sqlite", "postgres", "postgresql", "pgsql"),
)
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ------------------------------------------------------------------ external servers

REDIS_URL = env_url("REDIS_URL", "redis://127.0.0.1:6379/0", schemes=("redis", "rediss"))
# The message bus (docs/adr/0022): the partition streams and every key in their slots, the recent messages'
# meta hashes and the storage pipeline's keys. REDIS_URL by default; it may be a Redis Cluster (the URL of any
# node as a seed), which REDIS_URL may not be (Celery, Django's cache and the channel layer need one Redis).
STREAMS_REDIS_URL = env_url("CHATSTREAM_STREAMS_REDIS_URL", REDIS_URL, schemes=("redis", "rediss"))
STREAMS_REDIS_CLUSTER = env_bool("CHATSTREAM_STREAMS_REDIS_CLUSTER", False)
FERRETDB_PORT = env_int("CHATSTREAM_FERRETDB_PORT", 27117, minimum=1, maximum=65535)
MONGODB_URI = env_url(
    "MONGODB_URI", f"mongodb://127.0.0.1:{FERRETDB_PORT}/chatstream", schemes=("mongodb", "mongodb+srv")
)
# Short on purpose: a role that cannot reach its servers should say so within seconds, not hang.
MONGODB_TIMEOUT_MS = env_int("CHATSTREAM_MONGODB_TIMEOUT_MS", 3000, minimum=100)

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": CACHE_PREFIX,
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # channels-redis blocks 5 s per receive (BZPOPMIN, its brpop_timeout) and redis-py's default socket
            # timeout is 5 s too: every idle receive raced the timeout and the brokers' session task died with
            # a TimeoutError every ~5 s (seen under `make run`). Three blocks' worth of margin.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}],
            "prefix": CHANNELS_PREFIX,
            # docs/adr/0020, the probe: the defaults (capacity 100) silently dropped ~1/5 of deliveries under load.
            "capacity": env_int("CHATSTREAM_CHANNEL_CAPACITY", 1000, minimum=10),
            "expiry": 60,
        },
    }
}

# ------------------------------------------------------------------ roles and the registry

ROLE = env_str("CHATSTREAM_ROLE", "")
# Loopback by default: nothing but the gateway should be reachable from outside (containers set 0.0.0.0).
BIND_HOST = env_str("CHATSTREAM_BIND", "127.0.0.1")
GATEWAY_PORT = env_int("CHATSTREAM_GATEWAY_PORT", 8000, minimum=1, maximum=65535)
# Internal instances listen on PORT_BASE + offset (see core/roles.py); 8100 keeps them clear of
# the gateway's 8000 and of the usual 8080/8443.
PORT_BASE = env_int("CHATSTREAM_PORT_BASE", 8100, minimum=1024, maximum=65000)
# A heartbeat every 2 s with a 6 s TTL: a SIGKILLed instance leaves the registry within 6 s, and two missed
# heartbeats (a GC pause, a busy core) are tolerated before a live one is dropped.
REGISTRY_HEARTBEAT_S = env_float("CHATSTREAM_REGISTRY_HEARTBEAT", 2.0, minimum=0.1)
REGISTRY_TTL_S = env_int("CHATSTREAM_REGISTRY_TTL", 6, minimum=1)
if REGISTRY_TTL_S <= REGISTRY_HEARTBEAT_S:
    raise ConfigError("CHATSTREAM_REGISTRY_TTL must be longer than CHATSTREAM_REGISTRY_HEARTBEAT")
# How long a role waits for Redis/MongoDB at start before it gives up with a message.
STARTUP_WAIT_S = env_float("CHATSTREAM_STARTUP_WAIT", 15.0, minimum=0.0)

# ------------------------------------------------------------------ identity

JWT_SIGNING_KEY = env_str("JWT_SIGNING_KEY", SECRET_KEY)
JWT_ALGORITHM = "HS256"  # pinned: never taken from a token's header
# 10 minutes: short enough that a leaked access token is soon useless, long enough that a client refreshes
# only a few times an hour. Refresh tokens rotate on every use.
JWT_ACCESS_TTL_S = env_int("JWT_ACCESS_TTL", 600, minimum=30, maximum=900)
JWT_REFRESH_TTL_S = env_int("JWT_REFRESH_TTL", 14 * 24 * 3600, minimum=60)
WS_TICKET_TTL_S = env_int("CHATSTREAM_WS_TICKET_TTL", 30, minimum=1, maximum=30)

# ------------------------------------------------------------------ REST API (api/)

# argon2id first (memory-hard); PBKDF2 stays so hashes made with it still verify and are upgraded on login.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.JWTAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer",
                                 "rest_framework.renderers.BrowsableAPIRenderer"],
    # JSON only: a form-encoded body would turn every value into a string list and blur the type checks.
    "DEFAULT_PARSER_CLASSES": ["api.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "api.exceptions.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ChatStream API",
    "DESCRIPTION": "REST API v1 of ChatStream (docs/interface.md). Errors are {\"error\": {code, message, details}}.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and Redoc from the installed sidecar package: the docs page works without a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "api.schema.error_responses_hook"],
}
# django-ratelimit on the shared Redis cache (CACHES["default"]): per client IP and per username.
RATELIMIT_USE_CACHE = "default"
API_RATE_LOGIN_IP = env_str("CHATSTREAM_RATE_LOGIN_IP", "30/m")
# Login back-off per (username, client), counting failed passwords only (OWASP: throttle, do not lock the
# owner out): 5 free failures (a person mistyping), then 1 s, 2 s, 4 s ... doubling per failure up to 15 min,
# so one client guesses at most ~100 passwords a day per account while the owner elsewhere logs in at once.
LOGIN_FREE_FAILURES = env_int("CHATSTREAM_LOGIN_FREE_FAILURES", 5, minimum=1)
LOGIN_BACKOFF_BASE_S = env_float("CHATSTREAM_LOGIN_BACKOFF_BASE", 1.0, minimum=0.001)
LOGIN_BACKOFF_MAX_S = env_float("CHATSTREAM_LOGIN_BACKOFF_MAX", 900.0, minimum=1.0)
API_RATE_REGISTER_IP = env_str("CHATSTREAM_RATE_REGISTER_IP", "20/h")
API_RATE_REGISTER_USER = env_str("CHATSTREAM_RATE_REGISTER_USER", "5/h")
# Searches per user (GET /search, docs/api.md): each may read up to 200 buckets (~0.3 s of FerretDB), so 30 a
# minute bounds one user to ~15 % of one store connection while a person typing queries never meets it.
API_RATE_SEARCH_USER = env_str("CHATSTREAM_RATE_SEARCH_USER", "30/m")
for _name, _rate in (("CHATSTREAM_RATE_LOGIN_IP", API_RATE_LOGIN_IP),
                     ("CHATSTREAM_RATE_SEARCH_USER", API_RATE_SEARCH_USER),
                     ("CHATSTREAM_RATE_REGISTER_IP", API_RATE_REGISTER_IP),
                     ("CHATSTREAM_RATE_REGISTER_USER", API_RATE_REGISTER_USER)):
    if not re.fullmatch(r"[1-9][0-9]*/[0-9]*[smhd]", _rate):
        raise ConfigError(f"{_name}={_rate!r} is not a rate: use N/s, N/m, N/h or N/d (e.g. 10/m)")
# Reactions (docs/protocol.md, "Reactions"; docs/adr/0037). The emoji a message may carry: a bounded set chosen
# by the operator, so the stored state stays small, every client can draw each one (GET /api/v1/reactions
# lists it) and no user-chosen string becomes a key. Default: the common set of chat apps (Slack's and Teams'
# defaults, Telegram's first row). At most REACTION_EMOJI_SET_MAX entries of at most 16 characters each.
REACTION_EMOJI_SET_MAX = 32
REACTION_EMOJI = env_list("CHATSTREAM_REACTION_EMOJI",
                          ["👍", "👎", "❤️", "😂", "😮", "😢", "🎉", "🙏", "🔥", "👀", "✅", "🚀"])
if not 1 <= len(REACTION_EMOJI) <= REACTION_EMOJI_SET_MAX or len(set(REACTION_EMOJI)) != len(REACTION_EMOJI) \
        or any(len(e) > 16 or "/" in e for e in REACTION_EMOJI):
    raise ConfigError(f"CHATSTREAM_REACTION_EMOJI must list 1 to {REACTION_EMOJI_SET_MAX} distinct emoji of at "
                      "most 16 characters, comma-separated, without '/'")
# Distinct emoji on one message: 8 (more is noise on screen, and it bounds a message's state: 8 lists of at
# most the conversation's members, 8 x 256 ids in the largest group). Emoji one user may put on one message: 4
# (enough for "agree + celebrate + thanks", not the whole palette).
REACTIONS_PER_MESSAGE = env_int("CHATSTREAM_REACTIONS_PER_MESSAGE", 8, minimum=1, maximum=REACTION_EMOJI_SET_MAX)
REACTIONS_PER_USER = env_int("CHATSTREAM_REACTIONS_PER_USER", 4, minimum=1, maximum=REACTION_EMOJI_SET_MAX)
# Peers whose X-Forwarded-For is believed (the gateway, which replaces any client-sent one).
TRUSTED_PROXIES = env_list("CHATSTREAM_TRUSTED_PROXIES", ["127.0.0.1", "::1"])
# The api role's ASGI server: uvicorn (+ uvloop, httptools), as the gateway and the brokers, by default: asked
# directly and interleaved with daphne, a latest page's p50 / p99 went 5.9 / 11.5 -> 5.0 / 8.2 ms
# (docs/adr/0047, docs/benchmarks.md); daphne stays supported.
API_SERVER = env_choice("CHATSTREAM_API_SERVER", "uvicorn", choices=("uvicorn", "daphne"))

# ------------------------------------------------------------------ gateway

# Connect timeout to an upstream: loopback/LAN connects take < 1 ms, so 1 s only passes a SYN that was
# lost once; a dead host fails fast and the request retries on another instance.
GATEWAY_CONNECT_TIMEOUT_S = env_float("CHATSTREAM_GATEWAY_CONNECT_TIMEOUT", 1.0, minimum=0.01)
# Read timeout: the slowest API call (a history page from MongoDB) answers in well under a second; 30 s
# is the point where a client is better off with a 504 than with waiting.
GATEWAY_READ_TIMEOUT_S = env_float("CHATSTREAM_GATEWAY_READ_TIMEOUT", 30.0, minimum=0.1)
# Breaker: 3 consecutive transport failures open it (one failure is a blip, three in a row with retries
# elsewhere is a dead instance), for 5 s (less than the registry TTL, so a restarted instance on the same
# address is probed again before its stale registration would have expired).
GATEWAY_BREAKER_THRESHOLD = env_int("CHATSTREAM_GATEWAY_BREAKER_THRESHOLD", 3, minimum=1)
GATEWAY_BREAKER_OPEN_S = env_float("CHATSTREAM_GATEWAY_BREAKER_OPEN", 5.0, minimum=0.1)
# Rate limits (django-ratelimit syntax: count/period, period s, m, h or d, e.g. 5/10s). Per IP: generous,
# a whole office may share one address. Per user: a chat client makes a few REST calls a minute.
# Sensitive routes (login, register, refresh, logout) get their own per-IP budget against password guessing.
GATEWAY_RATE_IP = env_str("CHATSTREAM_GATEWAY_RATE_IP", "600/m")
GATEWAY_RATE_USER = env_str("CHATSTREAM_GATEWAY_RATE_USER", "300/m")
GATEWAY_RATE_SENSITIVE = env_str("CHATSTREAM_GATEWAY_RATE_SENSITIVE", "30/m")
# WebSocket handshakes: a client reconnects a few times an hour; 60/m per IP lets an office reconnect
# after a broker restart, 20/m per user stops a reconnect loop.
GATEWAY_RATE_WS_IP = env_str("CHATSTREAM_GATEWAY_RATE_WS_IP", "60/m")
GATEWAY_RATE_WS_USER = env_str("CHATSTREAM_GATEWAY_RATE_WS_USER", "20/m")
# Frames a client may send on one WebSocket: a person types well under 10 frames/s (the web client sends
# typing at most every 2.5 s), a reconnect sends a few resume frames at once; 20/s sustained with bursts of
# 60 never touches a real client and stops a flood at the edge (close 4008).
GATEWAY_WS_FRAME_RATE = env_float("CHATSTREAM_GATEWAY_WS_FRAME_RATE", 20.0, minimum=0.1)
GATEWAY_WS_FRAME_BURST = env_int("CHATSTREAM_GATEWAY_WS_FRAME_BURST", 60, minimum=1)
# Per user, across gateways and brokers (docs/security.md): open WebSockets (a phone, a laptop and a dozen
# tabs; the slots of a killed gateway free themselves after the TTL), and client frames over all of them per
# window (1.5x one socket's sustained 20/s: a person has one active socket at a time; bursts of reconnecting
# tabs fit in the 10 s window). Past the socket cap the handshake is closed with 4011; past the frame budget
# the socket that sent the frame is closed with 4008.
# Liveness of a client's WebSocket at the gateway (docs/protocol.md, Liveness; docs/adr/0044). The kernel
# probes a connection idle for GATEWAY_WS_KEEPALIVE_IDLE_S (then 4 probes 5 s apart: a vanished client is
# noticed within 40 s, as with uvicorn's former 20 s ping + 20 s timeout) at no cost to the process; 0 turns
# it off. WebSocket pings stay as the backstop for what the kernel cannot see (a proxy that ends TCP in front
# of the gateway answers its probes) and keep idle intermediaries from dropping the socket: every 45 s, under
# the 60 s idle timeout common to proxies and load balancers, closed with 1011 when no pong comes in 20 s.
# 45 s instead of 20 s: 2.25x fewer ping/pong round trips per idle socket (docs/benchmarks.md).
GATEWAY_WS_KEEPALIVE_IDLE_S = env_int("CHATSTREAM_GATEWAY_WS_KEEPALIVE_IDLE", 20, minimum=0)
GATEWAY_WS_PING_INTERVAL_S = env_float("CHATSTREAM_GATEWAY_WS_PING_INTERVAL", 45.0, minimum=1.0)
GATEWAY_WS_PING_TIMEOUT_S = env_float("CHATSTREAM_GATEWAY_WS_PING_TIMEOUT", 20.0, minimum=1.0)
# Who sends those pings: one ping wheel per gateway process (gateway/pingwheel.py, docs/adr/0049), or, when
# false (or with a uvicorn whose internals messaging/transports.py does not know), uvicorn's own timer per
# socket. Kept switchable to compare the two in one benchmark run (bench/connects.py --gateway-env).
GATEWAY_WS_PING_WHEEL = env_bool("CHATSTREAM_GATEWAY_WS_PING_WHEEL", True)
# Allocations between two young collections of the gateway's cyclic GC (CPython's default: 700). In a wave of
# 4,000 connects the default ran ~650 young, ~60 middle and 5 full collections (15-16 % of the gateway's CPU);
# at 10,000: ~40, 3 and none, the gateway's CPU over the wave 0.88-0.91x, two runs each (bench/gateway_gc.py,
# docs/benchmarks.md, session 8). Full collections still come, as often per allocation as the middle ones.
GATEWAY_GC_THRESHOLD = env_int("CHATSTREAM_GATEWAY_GC_THRESHOLD", 10_000, minimum=100)
GATEWAY_WS_MAX_SOCKETS_PER_USER = env_int("CHATSTREAM_GATEWAY_WS_MAX_SOCKETS_PER_USER", 16, minimum=1)
GATEWAY_WS_SLOT_TTL_S = env_float("CHATSTREAM_GATEWAY_WS_SLOT_TTL", 60.0, minimum=3.0)
GATEWAY_RATE_WS_USER_FRAMES = env_str("CHATSTREAM_GATEWAY_RATE_WS_USER_FRAMES", "300/10s")
# Bodies of unauthenticated routes (login, register, refresh, logout: JSON of well under 1 KiB): anything
# bigger is refused with 413 before it is buffered (authenticated routes keep GATEWAY_MAX_BODY).
GATEWAY_MAX_PUBLIC_BODY = env_int("CHATSTREAM_GATEWAY_MAX_PUBLIC_BODY", 16 * 1024, minimum=1024)
# WebSocket Origins allowed besides those whose host is in ALLOWED_HOSTS (full origins, e.g. https://app.example).
GATEWAY_ALLOWED_ORIGINS = env_list("CHATSTREAM_GATEWAY_ALLOWED_ORIGINS", [])
# Who may reach Django admin through the gateway (route authorization), as networks.
GATEWAY_ADMIN_NETWORKS = env_list(
    "CHATSTREAM_GATEWAY_ADMIN_NETWORKS", ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
)
# Addresses of load balancers in front of the gateway whose X-Forwarded-For is believed (comma-separated
# IPs or networks). Empty: the TCP peer is the client, and X-Forwarded-For from clients is ignored.
GATEWAY_TRUSTED_PROXIES = env_list("CHATSTREAM_GATEWAY_TRUSTED_PROXIES", [])
# Request bodies are buffered (so a failed connect can be retried elsewhere): 10 MiB bounds the memory.
GATEWAY_MAX_BODY = env_int("CHATSTREAM_GATEWAY_MAX_BODY", 10 * 1024 * 1024, minimum=1024)
for _name in ("GATEWAY_RATE_IP", "GATEWAY_RATE_USER", "GATEWAY_RATE_SENSITIVE", "GATEWAY_RATE_WS_IP",
              "GATEWAY_RATE_WS_USER", "GATEWAY_RATE_WS_USER_FRAMES"):
    if not re.fullmatch(r"[1-9]\d*/\d*[smhd]", globals()[_name]):
        raise ConfigError(f"CHATSTREAM_{_name}={globals()[_name]!r} is not a rate like 30/m, 5/10s or 1000/h")

# ------------------------------------------------------------------ streams and storage

PARTITIONS = env_int("CHATSTREAM_PARTITIONS", 16, minimum=1, maximum=1024)
FLUSH_INTERVAL_S = env_float("CHATSTREAM_FLUSH_INTERVAL", 2.0, minimum=0.1)
BATCH_SIZE = env_int("CHATSTREAM_BATCH_SIZE", 500, minimum=1)
# Stream entries stay in Redis at least this long after they are persisted, so a reconnecting client
# resumes from Redis (fast) for a day of absence and from MongoDB beyond that (never a hole).
RESUME_WINDOW_S = env_int("CHATSTREAM_RESUME_WINDOW", 24 * 3600, minimum=60)
# 4,000 characters: a long chat message (Discord allows 2,000, Slack 40,000 but folds them); a frame with it
# stays far below the 64 KiB WebSocket frame limit even when every character is 4 UTF-8 bytes.
MESSAGE_MAX_CHARS = env_int("CHATSTREAM_MESSAGE_MAX_CHARS", 4000, minimum=1, maximum=15000)
# The recent window (docs/adr/0028): the newest messages of each conversation kept in Redis by the append
# script, so the latest history pages are served without a document-store read. 100 = two default pages
# (50) or half the largest one (200); at ~300 bytes a message that is ~30 KB per active conversation. A window
# holds more while its oldest messages are not persisted yet (it only drops persisted ones).
RECENT_MESSAGES = env_int("CHATSTREAM_RECENT_MESSAGES", 100, minimum=0, maximum=10000)
# A conversation's window expires this long after its last event (7 days: a week-old chat is read rarely, and
# then from the store); every append pushes it back.
RECENT_TTL_S = env_int("CHATSTREAM_RECENT_TTL", 7 * 24 * 3600, minimum=60)
# A conversation's message bucket in progress lives in Redis until its 50 seqs are persisted (docs/adr/0041);
# one idle this long is written into the store as it is (at most half the window's TTL, so a conversation
# never loses its window while its newest bucket is only in Redis). A day: a conversation quiet for a day and
# then active again pays the old per-message bucket rewrite until that bucket is full; Redis holds at most
# ~15 KB per conversation active in the last day.
BUCKET_TAIL_IDLE_S = env_int("CHATSTREAM_BUCKET_TAIL_IDLE", 24 * 3600, minimum=1)

# ------------------------------------------------------------------ real-time brokers (WebSocket)

# Client frames a connection may send per second, sustained, and in a burst (token bucket). 20/s is far
# above a person typing (a few messages and typing signals a second) and leaves room for a client that
# catches up after being offline; the burst of 60 absorbs a resume plus a queue of unsent messages.
WS_RATE_PER_S = env_float("CHATSTREAM_WS_RATE", 20.0, minimum=0.1)
WS_RATE_BURST = env_int("CHATSTREAM_WS_BURST", 60, minimum=1)
# Bytes a connection may have waiting in the server's send buffer (for 5 s, or 4x at once) before it is
# closed with 4009 as too slow: 1 MiB is ~3,000 typical frames, minutes of a busy group for a healthy
# client, and bounds what a stalled reader can cost (4 MiB each: the knob to lower for many connections).
WS_SEND_BUFFER_BYTES = env_int("CHATSTREAM_WS_SEND_BUFFER", 1024 * 1024, minimum=16 * 1024)
# The ASGI server of the broker role: uvicorn (+ uvloop, httptools, websockets-sansio) by default, measured at
# ~2x daphne's deliveries per core with the same consumer (docs/adr/0023, docs/benchmarks.md); daphne stays
# supported and tested.
BROKER_SERVER = env_choice("CHATSTREAM_BROKER_SERVER", "uvicorn", choices=("uvicorn", "daphne"))
# WebSocket keepalive of the brokers' server: a ping after this many idle seconds, the connection closed when
# no pong comes within the timeout. It is how a client that vanished without closing (a phone losing its
# network) is noticed and announced offline. 20/20 s are uvicorn's defaults; at 5,000 idle connections that is
# ~250 pings and pongs/s, which measured as noise next to the rest (60 s instead changed the idle CPU from 5.6 %
# to 5.3 % of a core, docs/benchmarks.md), so detection time wins.
WS_PING_INTERVAL_S = env_float("CHATSTREAM_WS_PING_INTERVAL", 20.0, minimum=1.0)
WS_PING_TIMEOUT_S = env_float("CHATSTREAM_WS_PING_TIMEOUT", 20.0, minimum=1.0)
# Redis connections one broker may open for its commands (redis-py does not multiplex: a command holds one
# from send until its coroutine resumes, which under load includes event-loop latency). Measured with
# `manage.py bench` (1,000 connections, 500 msg/s): a pool of 64 made commands queue for connections and the
# broker fell behind at ~170 msg/s with its CPU mostly idle; 1,000 kept up. Redis allows 10,000 clients by
# default: with many brokers, raise Redis' maxclients or lower this.
BROKER_REDIS_POOL = env_int("CHATSTREAM_BROKER_REDIS_POOL", 1000, minimum=8)
# Seconds between two freezes of a broker's surviving objects out of the cyclic GC's reach (messaging/heap.py,
# docs/adr/0052); 0 leaves the collector as Python runs it. 10 s: a settle then collects only what survived
# those 10 s (a few ms at 5,000 deliveries/s over 10,000 connections), and a connection frozen once is walked
# again only at a thaw, where each full collection of 10,000 connections cost 0.35-0.9 s (docs/benchmarks.md).
BROKER_GC_FREEZE_S = env_float("CHATSTREAM_BROKER_GC_FREEZE", 10.0, minimum=0.0)
# Closed connections between two thaws (one full collection, frozen objects included: what a closed connection
# left in reference cycles is freed then). 2,000 at the ~15 KB of an idle connection bound what waits for it to
# ~30 MB, and keep a reconnect storm of 10,000 sockets to five full collections (messaging/heap.py).
BROKER_GC_THAW_AFTER_CLOSES = env_int("CHATSTREAM_BROKER_GC_THAW_AFTER_CLOSES", 2000, minimum=1)
# Presence (docs/protocol.md, "Presence and typing"). A broker refreshes the expiry of its sessions every
# PRESENCE_REFRESH_S; a session not refreshed for PRESENCE_TTL_S stops counting. 60 s: a third of it (20 s) is
# one cheap pipeline per broker, and two missed refreshes (a GC pause, a Redis failover) are tolerated before a
# live user is shown offline, while someone whose only device was on a crashed broker is shown offline within
# about a minute. Every PRESENCE_SWEEP_S each broker looks for users whose last session expired that way
# and announces them offline (exactly once across brokers), at most PRESENCE_SWEEP_BATCH users per pass.
PRESENCE_TTL_S = env_int("CHATSTREAM_PRESENCE_TTL", 60, minimum=2)
PRESENCE_REFRESH_S = env_float("CHATSTREAM_PRESENCE_REFRESH", PRESENCE_TTL_S / 3, minimum=0.1)
if PRESENCE_REFRESH_S >= PRESENCE_TTL_S:
    raise ConfigError("CHATSTREAM_PRESENCE_REFRESH must be shorter than CHATSTREAM_PRESENCE_TTL")
PRESENCE_SWEEP_S = env_float("CHATSTREAM_PRESENCE_SWEEP", min(5.0, PRESENCE_REFRESH_S / 4), minimum=0.1)
PRESENCE_SWEEP_BATCH = env_int("CHATSTREAM_PRESENCE_SWEEP_BATCH", 100, minimum=1)

# ------------------------------------------------------------------ Celery

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "storage"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Longer than any drain (a batch is bounded by BATCH_SIZE and takes well under a minute), so a slow
    # drain is never redelivered to a second worker while the first still runs.
    "visibility_timeout": env_int("CHATSTREAM_CELERY_VISIBILITY_TIMEOUT", 600, minimum=30),
    "global_keyprefix": CELERY_PREFIX,
}
# Fetch a task only when the (solo) pool is free: a busy worker never holds drains another could run.
CELERY_WORKER_DISABLE_PREFETCH = True

# ------------------------------------------------------------------ storage drain
# See docs/storage.md. Times in seconds unless the name says otherwise.
# A queued or running drain holds its partition's lock this long at most: a drain of BATCH_SIZE (500) entries
# takes ~0.1-0.5 s on the dev machine (docs/benchmarks.md), so 30 s never cuts a live chain short, while a lock
# left by a SIGKILLed worker stops blocking new drains within one minute.
DRAIN_LOCK_TTL_S = env_int("CHATSTREAM_DRAIN_LOCK_TTL", 30, minimum=1)
# Entries pending this long on one consumer are presumed orphaned and reclaimed (XAUTOCLAIM) by the next drain:
# the same 30 s, so a slow but live worker is not robbed mid-batch (reclaiming would still be harmless).
DRAIN_RECLAIM_IDLE_S = env_float("CHATSTREAM_DRAIN_RECLAIM_IDLE", 30.0, minimum=0.05)
# An entry whose write failed this many times for a reason of its own (not an outage) is dead-lettered;
# 3 rides out a reordering by concurrent drains (an edit before its message) and stops a real poison quickly.
DRAIN_MAX_ATTEMPTS = env_int("CHATSTREAM_DRAIN_MAX_ATTEMPTS", 3, minimum=1)
# An entry delivered this many times without being acked (its worker died each time) is dead-lettered.
DRAIN_MAX_DELIVERIES = env_int("CHATSTREAM_DRAIN_MAX_DELIVERIES", 10, minimum=2)
# After a MongoDB/Redis outage a partition is retried no sooner than this (the lock is kept this long):
# one flush interval, at least 1 s, so an outage costs a handful of cheap attempts a minute per partition.
DRAIN_RETRY_BACKOFF_S = max(1, round(FLUSH_INTERVAL_S))
# Dead letters kept (XADD MAXLEN ~): far more than staff can triage, small in memory (~1 KB each).
DEADLETTER_MAXLEN = env_int("CHATSTREAM_DEADLETTER_MAXLEN", 100_000, minimum=100)
# Test hook only: a drain sleeps this long after its bulk write and before XACK (fault tests kill it there).
TEST_PAUSE_BEFORE_ACK_S = env_float("CHATSTREAM_TEST_PAUSE_BEFORE_ACK", 0.0, minimum=0.0)
# The time trigger: every flush interval a tick enqueues a drain for each partition with a backlog. A tick
# that waited longer than an interval in the queue is dropped: the next one does the same work.
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "storage-drain-tick": {
        "task": "storage.tasks.drain_tick",
        "schedule": FLUSH_INTERVAL_S,
        "options": {"queue": "storage", "expires": max(FLUSH_INTERVAL_S, 1.0)},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
