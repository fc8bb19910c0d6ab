"""Names vulture (`make test`, configured in pyproject.toml) takes for dead code, and why each is alive.

Each line names something our code never calls but something else reads: Django, DRF, drf-spectacular,
Celery signals, a template, a server's protocol object, a JSON dump of a dataclass, or the tests. A name that
is really dead is deleted, not listed here.
"""
# ruff: noqa
# mypy: ignore-errors
from vulture.whitelist_utils import Whitelist

_ = Whitelist()

# DRF: the request user's interface, the authentication class (settings.REST_FRAMEWORK), the exception handler
is_authenticated
is_anonymous
JWTAuthentication
exception_handler
# drf-spectacular: the postprocessing hook (settings.SPECTACULAR_SETTINGS) and the signatures it calls
error_responses_hook
generator
public
auto_schema
# fields of serializers and documents, read by DRF, mongoengine, the admin's templates or JSON dumps
chat_id
issued_at
member1
member2
edit_seq
deleted_at
last_batch_ms
next_cursor
_.behind  # api/templates/admin/api/conversation_list.html
# bench/fanout.py: fields of the result dataclass, written to the run's JSON with dataclasses.asdict
server_cpu_s
client_cpu_s
missing_sample
_.server_cpu_s
_.client_cpu_s
_.missing_sample
_.should_exit  # uvicorn.Server reads it to stop (bench/ws_memory.py)
# Celery signal receivers (connected by decorator)
_worker_ready
_beat_init
_worker_shutdown
# chatstream_site/localservers.py and localcluster.py: the harness the tests call (tests import them
# directly)
_.restart
run_with_redis
redis_cluster_start
manage
_.program_set
_.program_info
_.role_pids
_.access_log
settle
# Django settings, read by name
MIDDLEWARE
SECURE_PROXY_SSL_HEADER
ROOT_URLCONF
ASGI_APPLICATION
TEMPLATES
DATABASES
AUTH_PASSWORD_VALIDATORS
LANGUAGE_CODE
TIME_ZONE
USE_I18N
USE_TZ
STATIC_URL
STATIC_ROOT
DEFAULT_AUTO_FIELD
CHANNEL_LAYERS
PASSWORD_HASHERS
REST_FRAMEWORK
SPECTACULAR_SETTINGS
RATELIMIT_USE_CACHE
CELERY_BROKER_URL
CELERY_RESULT_BACKEND
CELERY_TASK_IGNORE_RESULT
CELERY_TASK_DEFAULT_QUEUE
CELERY_TASK_ACKS_LATE
CELERY_TASK_REJECT_ON_WORKER_LOST
CELERY_WORKER_PREFETCH_MULTIPLIER
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP
CELERY_BROKER_TRANSPORT_OPTIONS
CELERY_WORKER_DISABLE_PREFETCH
CELERY_BEAT_SCHEDULE
LOGGING
# read-only views of gateway state, for tests and operators (tests/gateway/test_gateway_units.py)
public_paths
_.breaker_state
# Channels' consumer attributes and autobahn/uvicorn protocol attributes, read by those libraries
channel_layer_alias
_.channel_layer
_.maxFramePayloadSize
_.failByDrop
_.close_timer
# messaging/events.py: the payload fields of each event type, the table tests/realtime/test_events.py checks
PAYLOAD_FIELDS
# asyncio.Protocol callbacks of the lean Redis client (messaging/resp.py) and of the gateway's broker link
# (gateway/wslink.py), called by the event loop
connection_made
data_received
connection_lost
pause_writing
resume_writing
# core.keys: which Redis each key lives on, read by tests/cluster/test_keys.py
REDIS_OF
# messaging/events.py: optional payload fields (reply_to), checked by tests/realtime/test_events.py
PAYLOAD_OPTIONAL
# storage/documents.py: the reaction guard the drain writes ($set) and reads by _id; api/serializers.py:
# the quote's field, described for the OpenAPI schema
_.rx_seq
_.excerpt
# Django's ASGIHandler.run_get_response calls it (chatstream_site/handler.py ApiHandler)
get_response_async
# uvicorn imports the roles' WebSocket protocol class by its dotted name (chatstream_site/uvicorn_main.py)
SlottedWebSocketsSansIOProtocol
