import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from deployments.signatures import ModelSignature


def upload_path(deployment: "Deployment", kind: str) -> str:
    # Server-generated names only: the client's file name is never a path.
    return f"deployments/{deployment.public_id}/{kind}"


MODEL_EXTENSIONS = {"pickle": "pkl", "joblib": "joblib", "skops": "skops"}


def model_upload_to(instance: "Deployment", filename: str) -> str:
    return upload_path(instance, instance.model_basename())


def requirements_upload_to(instance: "Deployment", filename: str) -> str:
    return upload_path(instance, "requirements.txt")


class Deployment(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        DEPLOYING = "deploying", "Deploying"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        STOPPING = "stopping", "Stopping"
        STOPPED = "stopped", "Stopped"

    class Stage(models.TextChoices):
        INSPECT = "inspect", "Inspect"
        ENVIRONMENT = "environment", "Environment"
        VALIDATE = "validate", "Validate"
        PACKAGE = "package", "Package"
        BUILD = "build", "Build"
        PUSH = "push", "Push"
        PROVISION = "provision", "Provision"
        VERIFY = "verify", "Verify"
        TEARDOWN = "teardown", "Teardown"  # stopping an aws deployment; not a pipeline stage

    class Target(models.TextChoices):
        LOCAL = "local", "Local (this host)"
        AWS = "aws", "AWS Lambda"

    class Format(models.TextChoices):
        PICKLE = "pickle", "pickle"
        JOBLIB = "joblib", "joblib"
        SKOPS = "skops", "skops"

    TERMINAL = (Status.READY, Status.FAILED, Status.STOPPED)

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # PROTECT: deleting the row would leave its model processes running, its files on disk and an aws
    # deployment's resources in the account; a user who owns deployments is deactivated instead.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="deployments")
    name = models.CharField(max_length=100)
    target = models.CharField(max_length=10, choices=Target.choices, default=Target.LOCAL)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    stage = models.CharField(max_length=12, choices=Stage.choices, blank=True)
    error = models.TextField(blank=True)

    model_file = models.FileField(upload_to=model_upload_to, max_length=255)
    model_filename = models.CharField(max_length=255, help_text="As uploaded; shown, never used as a path.")
    model_format = models.CharField(max_length=10, choices=Format.choices, default=Format.PICKLE)
    model_sha256 = models.CharField(max_length=64)
    requirements_file = models.FileField(upload_to=requirements_upload_to, max_length=255)
    requirements_filename = models.CharField(max_length=255)

    environment_key = models.CharField(max_length=64, blank=True)
    # [module, name] pairs the inspect stage found, all on the allowlist: the restricted
    # loader imports exactly these (skops: builds exactly these types), nothing else.
    allowed_globals = models.JSONField(default=list, blank=True)
    # What the inspect stage read from the file with ServeML's own scan (never the model's code):
    # the scikit-learn version it was saved with. Null until inspected, "" when none is recorded.
    pickled_sklearn_version = models.CharField(max_length=64, null=True, blank=True)
    # What the sandboxed probe reported about the loaded model: untrusted, so it is parsed
    # strictly into a ModelSignature before it is stored, and read back through one.
    signature = models.JSONField(default=dict, blank=True)
    example_request = models.JSONField(null=True, blank=True)
    example_response = models.JSONField(null=True, blank=True)
    artifact = models.CharField(max_length=255, blank=True, help_text="Build context in storage.")
    endpoint_url = models.URLField(max_length=500, blank=True)
    # Private endpoints answer only requests carrying one of the deployment's keys.
    is_private = models.BooleanField(default=False)

    # Cloud resources the deployment owns (aws target).
    image_uri = models.CharField(max_length=500, blank=True)
    image_size_bytes = models.BigIntegerField(null=True, blank=True)
    function_arn = models.CharField(max_length=500, blank=True)
    api_id = models.CharField(max_length=100, blank=True)
    # The published Lambda version holding this row's image (aws): the deployment's alias points
    # at it to serve it. A version's own field; set by its provision stage, and again whenever
    # it is published anew because the function's keys changed since (aws.current_lambda_version).
    lambda_version = models.CharField(max_length=20, blank=True)

    # The pipeline's progress, so that a task that takes over resumes where a dead one stopped.
    completed_stages = models.JSONField(default=list, blank=True)
    # Who runs it now: a task's claim holds a lease that its heartbeat renews (see services.deployment_claim).
    claim_token = models.CharField(max_length=32, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Times the worker running it (or stopping it) stopped mid-way; the reaper gives up past a bound.
    interruptions = models.PositiveSmallIntegerField(default=0)
    # When its task was last sent to the broker; null while the broker could not take it.
    enqueued_at = models.DateTimeField(null=True, blank=True)

    # Versions: each upload to a deployment is a row of its own (files, pipeline, events,
    # model processes). The deployment a user created is the root and its own version 1;
    # later versions point at it. Its stable URL (the root's endpoint_url) routes to
    # `serving` (null: the root itself), which only services.deployment_version_promote moves.
    version_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="versions", editable=False
    )
    version = models.PositiveIntegerField(default=1, editable=False)
    serving = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    # A version that becomes ready is promoted at once, unless its owner asked to review it first.
    auto_promote = models.BooleanField(default=True)
    # A canary (on the root): a ready version that answers `canary_percent` of the stable URL's
    # requests while `serving` answers the rest. Only the canary services and promote move it.
    canary = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    canary_percent = models.PositiveSmallIntegerField(default=0, editable=False)
    # Shadow (on the root): a ready version that also predicts a sample of the live requests,
    # after they are answered, so its owner sees how often it agrees before promoting it.
    shadow = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    # A version its owner deleted (services.deployment_version_delete): it is stopped like a
    # deployment, and its files go too; its row and event log stay, as a stopped deployment's do.
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["version_of", "version"], name="unique_version_number"),
        ]

    def __str__(self):
        if self.version_of_id:
            return f"{self.name} v{self.version} ({self.public_id})"
        return f"{self.name} ({self.public_id})"

    def get_absolute_url(self):
        return reverse("deployment-detail", args=[self.public_id])

    def update(self, **fields) -> None:
        """Set and save these fields of this row only (a stage's own findings)."""
        for name, value in fields.items():
            setattr(self, name, value)
        self.save(update_fields=[*fields, "updated_at"])

    def record_event(
        self, *, stage: str, message: str, level: str = "info", duration_ms: int | None = None
    ) -> "DeploymentEvent":
        return self.events.create(stage=stage, level=level, message=message, duration_ms=duration_ms)

    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    def can_stop(self) -> bool:
        # A version stops with its deployment, never alone: it may be the one serving.
        return not self.version_of_id and self.status in (self.Status.READY, self.Status.FAILED)

    def is_deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def root(self) -> "Deployment":
        """The deployment this version belongs to (itself for version 1)."""
        return self.version_of if self.version_of_id else self

    def serving_version(self) -> "Deployment":
        """The version the root's stable URL answers with."""
        root = self.root
        return root.serving if root.serving_id else root

    def all_versions(self) -> list["Deployment"]:
        """Version 1 (the root) and every later one, newest first."""
        root = self.root
        return [*root.versions.order_by("-version"), root]

    def model_basename(self) -> str:
        return f"model.{MODEL_EXTENSIONS[self.model_format]}"

    def active_keys(self):
        return self.keys.filter(revoked_at__isnull=True)

    @property
    def model_signature(self) -> ModelSignature:
        return ModelSignature.from_stored(self.signature)

    @property
    def model_type(self) -> str:
        return self.model_signature.model_type


class DeploymentEvent(models.Model):
    class Level(models.TextChoices):
        INFO = "info", "info"
        WARNING = "warning", "warning"
        ERROR = "error", "error"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    stage = models.CharField(max_length=12, blank=True)
    level = models.CharField(max_length=10, choices=Level.choices, default=Level.INFO)
    message = models.TextField()
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"[{self.stage or '-'}] {self.message[:60]}"


class AllowedGlobal(models.Model):
    """An import an operator allows beyond the reviewed allowlist (a user's own class, xgboost, …)."""

    module = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    note = models.CharField(max_length=300, blank=True, help_text="Why it is safe to import, for the next operator.")
    added_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["module", "name"]
        constraints = [models.UniqueConstraint(fields=["module", "name"], name="unique_allowed_global")]

    def __str__(self):
        return f"{self.module}.{self.name}"


class AllowedPackage(models.Model):
    """A package a requirements.txt may name beyond SERVEML_ALLOWED_PACKAGES. Its code runs in models' sandboxes."""

    name = models.CharField(max_length=200, unique=True, help_text="The package's name on the index (PEP 503).")
    note = models.CharField(max_length=300, blank=True, help_text="Why it is safe to install, for the next operator.")
    added_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class DeploymentKey(models.Model):
    """An API key for a private prediction URL. Only its SHA-256 is kept; the key is shown once."""

    PREFIX = "sml_"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="keys")
    name = models.CharField(max_length=100)
    hint = models.CharField(max_length=12, help_text="The key's first characters, to tell keys apart.")
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.hint}…)"

    @classmethod
    def issue(cls, *, deployment: Deployment, name: str) -> tuple["DeploymentKey", str]:
        """A new key: the row, and the key itself, which is never stored (only its digest)."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            deployment=deployment, name=name.strip()[:100] or "key", hint=raw[:10], key_sha256=cls.digest(raw)
        )
        return key, raw

    @staticmethod
    def digest(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()

    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoke(self) -> None:
        """Revoke it, once: the first revocation's time stays."""
        DeploymentKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
