from django.contrib import admin, messages

from deployments import services
from deployments.models import AllowedGlobal, AllowedPackage, Deployment, DeploymentEvent
from deployments.pipeline.errors import StageError


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    extra = 0
    can_delete = False
    fields = ["created_at", "stage", "level", "message", "duration_ms"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "status", "stage", "target", "model_type", "created_at"]
    list_filter = ["status", "target", "stage", "created_at"]
    search_fields = ["name", "public_id", "owner__username", "model_filename", "model_sha256", "endpoint_url"]
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    inlines = [DeploymentEventInline]
    actions = ["redeploy", "stop"]
    readonly_fields = [
        "public_id",
        "status",
        "stage",
        "error",
        "model_file",
        "model_filename",
        "model_format",
        "model_sha256",
        "requirements_file",
        "requirements_filename",
        "environment_key",
        "signature",
        "example_request",
        "example_response",
        "artifact",
        "endpoint_url",
        "image_uri",
        "function_arn",
        "api_id",
        "created_at",
        "updated_at",
        "claimed_at",
        "ready_at",
        "stopped_at",
    ]

    @admin.action(description="Redeploy the selected deployments")
    def redeploy(self, request, queryset):
        count = 0
        for deployment in queryset:
            if deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.STOPPING):
                services.deployment_redeploy(deployment=deployment)
                count += 1
        self.message_user(request, f"{count} deployment(s) queued again.", messages.SUCCESS)

    @admin.action(description="Stop the selected deployments")
    def stop(self, request, queryset):
        count = 0
        for deployment in queryset:
            if deployment.can_stop():
                try:
                    services.deployment_request_stop(deployment=deployment)
                    count += 1
                except StageError as exc:
                    self.message_user(request, f"{deployment}: {exc}", messages.ERROR)
        self.message_user(
            request,
            f"{count} deployment(s) stopped (aws ones once a worker has deleted their "
            "resources: their status is 'stopping' until then).",
            messages.SUCCESS,
        )


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "deployment", "stage", "level", "message"]
    list_filter = ["level", "stage"]
    search_fields = ["message", "deployment__name", "deployment__public_id"]
    list_select_related = ["deployment"]


@admin.register(AllowedGlobal)
class AllowedGlobalAdmin(admin.ModelAdmin):
    """Imports allowed beyond the reviewed allowlist. Each one lets models run that code: review before adding."""

    list_display = ["module", "name", "note", "added_by", "created_at"]
    search_fields = ["module", "name", "note"]
    readonly_fields = ["added_by", "created_at"]

    def save_model(self, request, obj, form, change):
        if not change:
            obj.added_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(AllowedPackage)
class AllowedPackageAdmin(admin.ModelAdmin):
    """Packages allowed beyond SERVEML_ALLOWED_PACKAGES. Each one's code runs in models' sandboxes: review first."""

    list_display = ["name", "note", "added_by", "created_at"]
    search_fields = ["name", "note"]
    readonly_fields = ["added_by", "created_at"]

    def save_model(self, request, obj, form, change):
        if not change:
            obj.added_by = request.user
        super().save_model(request, obj, form, change)
