"""ServeML settings: one file, read from environment variables, with local defaults.

Everything a developer needs runs with no variables set (SQLite, Redis on
localhost, files under ./var). Production sets the variables documented in
README.md ("Configuration").
"""

import hashlib
import hmac
import os
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool) -> bool:
    """A typo must not read as False: `SERVEML_SANDBOX=of` switching a protection off is worse than an error."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in TRUE:
        return True
    if value.strip().lower() in FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off.")


def env_number(name: str, default, kind=int):
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return kind(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}.") from None


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}.")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", True)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise RuntimeError("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: the docs page works offline
    "axes",
    "deployments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: turns a lock into the 429 page
]

ROOT_URLCONF = "serveml.urls"
WSGI_APPLICATION = "serveml.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "deployments.views.site_context",
            ],
        },
    },
]

# All runtime state lives under one folder outside the source packages.
# Created, private to ServeML's user (0700), by deployments.apps at start-up, not here.
DATA_DIR = Path(os.environ.get("SERVEML_DATA_DIR", BASE_DIR / "var")).resolve()

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{DATA_DIR / 'serveml.sqlite3'}"),
        conn_max_age=60,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Tests share the database with a real worker and runtime process, so the
    # test database must be a file, not SQLite's private in-memory database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
    DATABASES["default"]["OPTIONS"] = {"timeout": 20}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "deployment-list"
LOGOUT_REDIRECT_URL = "login"

# Sign-in throttling (django-axes): failed sign-ins on the sign-in page, the admin's and
# POST /api/token count per account and per address. SERVEML_SIGNIN_FAILURE_LIMIT of
# either within the cool-off lock that account, or that address, until the cool-off has
# passed since the last counted failure; meanwhile even the right password is answered 429.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_FAILURE_LIMIT = env_number("SERVEML_SIGNIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_number("SERVEML_SIGNIN_COOLOFF_MINUTES", 15.0, float))
# Refused tries during a lock are not counted, so a lock ends one cool-off after the last
# counted failure even while someone keeps hammering (the owner is not locked out for as
# long as an attack lasts), and an attacker still gets FAILURE_LIMIT guesses per cool-off.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
# A success must not clear the count, or an attacker with an account of their own would
# reset their address's count between guesses at someone else's.
AXES_RESET_ON_SUCCESS = False
AXES_LOCKOUT_CALLABLE = "deployments.signin.throttled_response"
AXES_CLIENT_IP_CALLABLE = "deployments.signin.client_address"
AXES_DISABLE_ACCESS_LOG = True  # failures are counted; successful sign-ins need no table of their own
# How many reverse proxies in front of the web process append to X-Forwarded-For. 0: the
# peer's address counts. Set it behind a proxy, or every client shares the proxy's address.
SERVEML_TRUSTED_PROXIES = env_number("SERVEML_TRUSTED_PROXIES", 0)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"  # filled by collectstatic for production

# Uploads are kept under DATA_DIR/media, which no URL pattern serves: model
# files are only ever read by the pipeline, never handed out by the web server.
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "/media/"
AWS_STORAGE_BUCKET_NAME = os.environ.get("AWS_STORAGE_BUCKET_NAME", "")
STORAGES = {
    "default": {
        "BACKEND": "storages.backends.s3.S3Storage"
        if AWS_STORAGE_BUCKET_NAME
        else "django.core.files.storage.FileSystemStorage",
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# WhiteNoise serves static files straight from the source folders, so no
# collectstatic step is needed to run the web process.
WHITENOISE_USE_FINDERS = True
if not AWS_STORAGE_BUCKET_NAME:
    STORAGES["default"]["OPTIONS"] = {"location": MEDIA_ROOT}

# Uploads larger than this never reach memory: they are streamed to a
# temporary file and cut off as soon as they pass SERVEML_MAX_UPLOAD_BYTES.
SERVEML_MAX_UPLOAD_BYTES = env_number("SERVEML_MAX_UPLOAD_BYTES", 200 * 1024 * 1024)
SERVEML_MAX_REQUIREMENTS_BYTES = 64 * 1024
# CSV batch predictions from a deployment's page: the largest CSV accepted (a million rows
# of a few features is some 50 MB), the most lines read, and the rows sent per call.
SERVEML_MAX_CSV_BYTES = env_number("SERVEML_MAX_CSV_BYTES", 256 * 1024 * 1024)
SERVEML_CSV_MAX_LINES = env_number("SERVEML_CSV_MAX_LINES", 5_000_000)
SERVEML_CSV_BATCH_ROWS = env_number("SERVEML_CSV_BATCH_ROWS", 2_000)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_HANDLERS = [
    "deployments.uploads.SizeLimitUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

SERVEML_ALLOW_SIGNUP = env_bool("SERVEML_ALLOW_SIGNUP", True)

# The local runtime that answers prediction URLs.
SERVEML_RUNTIME_HOST = os.environ.get("SERVEML_RUNTIME_HOST", "127.0.0.1")
SERVEML_RUNTIME_PORT = env_number("SERVEML_RUNTIME_PORT", 8001)
SERVEML_RUNTIME_URL = os.environ.get(
    "SERVEML_RUNTIME_URL", f"http://{SERVEML_RUNTIME_HOST}:{SERVEML_RUNTIME_PORT}"
).rstrip("/")
# Where ServeML's own processes reach the runtime (control calls, verify, try-it);
# differs from the public URL only when they run in separate containers.
SERVEML_RUNTIME_INTERNAL_URL = os.environ.get("SERVEML_RUNTIME_INTERNAL_URL", SERVEML_RUNTIME_URL).rstrip("/")
# Shared secret for the worker → runtime control calls (register, stop). By default derived
# from SECRET_KEY, never SECRET_KEY itself: it travels in a header that a proxy may log.
SERVEML_RUNTIME_TOKEN = (
    os.environ.get("SERVEML_RUNTIME_TOKEN")
    or hmac.new(SECRET_KEY.encode(), b"serveml.runtime.token", hashlib.sha256).hexdigest()
)
SERVEML_MODEL_MEMORY_BYTES = env_number("SERVEML_MODEL_MEMORY_BYTES", 2 * 1024**3)
SERVEML_PREDICT_TIMEOUT_S = env_number("SERVEML_PREDICT_TIMEOUT_S", 30.0, float)
# Model processes of a deployment nobody called for this long are stopped (scale to zero);
# the next request starts them again (a cold start). 0 keeps them forever.
SERVEML_MODEL_IDLE_SECONDS = env_number("SERVEML_MODEL_IDLE_SECONDS", 900.0, float)


# Model environments.
def _default_env_python() -> str:
    # The sandbox runs model code as an unprivileged user, who must be able to run
    # the interpreter: prefer the system Python of the same version over one under
    # a private home folder (pyenv under /root, say).
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return system if os.path.exists(system) else getattr(sys, "_base_executable", sys.executable)


SERVEML_ENV_PYTHON = os.environ.get("SERVEML_ENV_PYTHON") or _default_env_python()
SERVEML_PACKAGE_INDEX_URL = os.environ.get("SERVEML_PACKAGE_INDEX_URL", "")
# The packages a requirements.txt may name (operators add more in the admin, or here).
# Every package runs code in the model's sandbox: review before adding. "*" allows any.
SERVEML_ALLOWED_PACKAGES = env_list(
    "SERVEML_ALLOWED_PACKAGES",
    "scikit-learn,numpy,scipy,pandas,joblib,threadpoolctl,skops,lz4,python-dateutil,pytz,tzdata,six,"
    "packaging,prettytable,wcwidth",
)
SERVEML_ENV_INSTALL_TIMEOUT_S = env_number("SERVEML_ENV_INSTALL_TIMEOUT_S", 900)

# The sandbox every user process runs in (deployments/sandbox.py). "off" is for a development
# machine only: models then run with limits but no isolation, and every page says so.
SERVEML_SANDBOX = env_choice("SERVEML_SANDBOX", "on", ("on", "off"))
# Deployment N's processes run as uid SERVEML_SANDBOX_UID_BASE + N on the host; the base itself
# compiles environments. Pick a range no account on the host uses.
SERVEML_SANDBOX_UID_BASE = env_number("SERVEML_SANDBOX_UID_BASE", 2_000_000)
# A model process is recycled after this much CPU time (its requests go to a fresh one).
SERVEML_MODEL_CPU_SECONDS = env_number("SERVEML_MODEL_CPU_SECONDS", 3600)
# How many uids from the base a template's user namespace maps (deployment pks must stay below).
SERVEML_SANDBOX_UID_COUNT = env_number("SERVEML_SANDBOX_UID_COUNT", 10_000_000)
# Model processes are forked from a warm template per environment and owner
# (deployments/runtime/templates.py); off: each starts its own interpreter, as before.
SERVEML_TEMPLATES = env_bool("SERVEML_TEMPLATES", True)
# A template with no model process left is stopped after this long.
SERVEML_TEMPLATE_IDLE_SECONDS = env_number("SERVEML_TEMPLATE_IDLE_SECONDS", 900.0, float)
# The runtime stops the least recently used deployments' model processes while their memory
# (proportional set size, templates included) is above this; 0: no budget. They load again on
# their next request.
SERVEML_RUNTIME_MEMORY_BYTES = env_number("SERVEML_RUNTIME_MEMORY_BYTES", 0)
# The validate stage's probe.
SERVEML_SANDBOX_CPU_SECONDS = env_number("SERVEML_SANDBOX_CPU_SECONDS", 60)
SERVEML_SANDBOX_WALL_SECONDS = env_number("SERVEML_SANDBOX_WALL_SECONDS", 120)
SERVEML_SANDBOX_MEMORY_BYTES = env_number("SERVEML_SANDBOX_MEMORY_BYTES", 2 * 1024**3)
# Extra (module, name) pairs a model may import, as "module:name" entries,
# for operators whose users ship their own classes.
SERVEML_EXTRA_ALLOWED_GLOBALS = env_list("SERVEML_EXTRA_ALLOWED_GLOBALS")

# The aws target: off until a region and a Lambda execution role are configured.
# Credentials come the standard boto3 way (environment, ~/.aws, instance role).
SERVEML_AWS_REGION = (
    os.environ.get("SERVEML_AWS_REGION") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
)
SERVEML_LAMBDA_ROLE_ARN = os.environ.get("SERVEML_LAMBDA_ROLE_ARN", "")
SERVEML_LAMBDA_MEMORY_MB = env_number("SERVEML_LAMBDA_MEMORY_MB", 1024)
SERVEML_LAMBDA_TIMEOUT_S = env_number("SERVEML_LAMBDA_TIMEOUT_S", 30)
# A Lambda version published again with new keys is deleted once no ServeML version records it and it is
# this old: younger, its pipeline may not have recorded it yet (aws.prune).
SERVEML_LAMBDA_PRUNE_AFTER_S = env_number("SERVEML_LAMBDA_PRUNE_AFTER_S", 3600)
SERVEML_LAMBDA_ARCHITECTURE = os.environ.get("SERVEML_LAMBDA_ARCHITECTURE", "x86_64")  # or arm64
SERVEML_LAMBDA_BASE_IMAGE = os.environ.get("SERVEML_LAMBDA_BASE_IMAGE", "public.ecr.aws/lambda/python:3.11")
# The wheel platform of that image's glibc: python:3.11 runs on Amazon Linux 2 (manylinux2014);
# base images on Amazon Linux 2023 (python:3.12 and later) take manylinux_2_28 wheels.
SERVEML_LAMBDA_MANYLINUX = os.environ.get("SERVEML_LAMBDA_MANYLINUX", "manylinux2014")
SERVEML_LAMBDA_PYTHON_VERSION = os.environ.get("SERVEML_LAMBDA_PYTHON_VERSION", "3.11")  # the base image's Python
SERVEML_ECR_REPOSITORY_PREFIX = os.environ.get("SERVEML_ECR_REPOSITORY_PREFIX", "serveml")
# The Docker engine the worker builds images with (docker SDK's DOCKER_HOST by default).
SERVEML_DOCKER_URL = os.environ.get("SERVEML_DOCKER_URL", "")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A task holds its deployment through a lease that its heartbeat renews every third of it:
# a live worker keeps it, a dead one loses it within this many seconds.
SERVEML_CLAIM_LEASE_S = env_number("SERVEML_CLAIM_LEASE_S", 60.0, float)
# The reaper (celery beat runs it this often) re-queues what a dead worker left, sends again
# a deployment still queued this long after its task was sent (or due, for a retry: the
# broker may have lost it), and fails one whose worker stopped this many times.
SERVEML_REAP_INTERVAL_S = env_number("SERVEML_REAP_INTERVAL_S", 30.0, float)
SERVEML_REQUEUE_QUEUED_AFTER_S = env_number("SERVEML_REQUEUE_QUEUED_AFTER_S", 300.0, float)
SERVEML_DEPLOY_MAX_ATTEMPTS = env_number("SERVEML_DEPLOY_MAX_ATTEMPTS", 3)
# A stage that runs longer than this fails its deployment (its heartbeat stops renewing
# the lease and says so), whatever it waits on; every step inside a stage has its own,
# shorter timeout (an environment: install and compile, SERVEML_ENV_INSTALL_TIMEOUT_S each).
SERVEML_STAGE_TIMEOUT_S = env_number("SERVEML_STAGE_TIMEOUT_S", 2400.0, float)
# The backstop: Celery kills a task's pool process (and, through their parent-death signal,
# the installs it runs) that outlives the longest pipeline (eight stages) by five minutes.
CELERY_TASK_TIME_LIMIT = int(SERVEML_STAGE_TIMEOUT_S * 8 + 300)
CELERY_BEAT_SCHEDULE = {
    # Expires: runs missed while no worker listened are dropped, not run in a burst later.
    "reap-deployments": {
        "task": "deployments.tasks.reap",
        "schedule": SERVEML_REAP_INTERVAL_S,
        "options": {"expires": SERVEML_REAP_INTERVAL_S},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes a call without credentials a 401, not a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "deployments.api.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "ServeML REST API",
    "DESCRIPTION": (
        "Deploy scikit-learn models and manage their deployments. Get a token with `POST /api/token`, "
        "then send it as `Authorization: Token <key>`. Each deployment's prediction URL has its own "
        "OpenAPI document: `GET /api/deployments/{id}/openapi.json`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_number("DJANGO_SECURE_HSTS_SECONDS", 60 * 60 * 24 * 30)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# Uploads are ServeML's alone: a sandbox gets its own copy through a file descriptor.
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700
