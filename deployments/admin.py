from django.contrib import admin, messages
from django.contrib.auth import admin as auth_admin
from django.contrib.auth import get_user_model
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from deployments import services
from deployments.forms import VersionForm
from deployments.models import AllowedGlobal, AllowedPackage, Deployment, DeploymentEvent
from deployments.pipeline.errors import StageError
from deployments.runtime import client


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    extra = 0
    can_delete = False
    fields = ["created_at", "stage", "level", "message", "duration_ms"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


class VersionInline(admin.TabularInline):
    """A deployment's later versions (version 1 is the deployment itself), each linking to its own page."""

    model = Deployment
    fk_name = "version_of"
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ["version", "status", "stage", "model_filename", "auto_promote", "created_at"]
    readonly_fields = fields
    ordering = ["-version"]

    def has_add_permission(self, request, obj=None):
        return False


class VersionsFilter(admin.SimpleListFilter):
    """The changelist shows deployments, not their versions, unless asked."""

    title = "versions"
    parameter_name = "versions"

    def lookups(self, request, model_admin):
        return [("all", "Deployments and their versions"), ("only", "Versions only")]

    def queryset(self, request, queryset):
        if self.value() == "all":
            return queryset
        if self.value() == "only":
            return queryset.filter(version_of__isnull=False)
        return queryset.filter(version_of__isnull=True)


ADMIN_CANARY_PERCENT = 10  # the page and the API take any share from 1 to 50


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "status", "stage", "target", "model_type", "serving_version", "created_at"]
    list_filter = [VersionsFilter, "status", "target", "stage", "created_at"]
    search_fields = ["name", "public_id", "owner__username", "model_filename", "model_sha256", "endpoint_url"]
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    inlines = [VersionInline, DeploymentEventInline]
    actions = ["redeploy", "stop", "promote", "canary", "end_canary", "delete_versions"]
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
        "deleted_at",
        "version_of",
        "version",
        "new_version",
        "live_figures",
    ]

    def has_delete_permission(self, request, obj=None):
        """Never: a deleted row would leave its model processes running, its files on disk and an aws
        deployment's resources in the account. Operators stop deployments and delete versions instead."""
        return False

    def get_urls(self):
        new_version = self.admin_site.admin_view(self.new_version_view)
        return [
            path("<int:pk>/new-version/", new_version, name="deployments_deployment_new_version"),
            *super().get_urls(),
        ]

    @admin.display(description="new version")
    def new_version(self, deployment):
        if deployment.version_of_id or not deployment.pk:
            return ""
        url = reverse("admin:deployments_deployment_new_version", args=[deployment.pk])
        return format_html('<a href="{}">Upload a new version</a> (the serving one keeps serving)', url)

    @admin.display(description="live figures")
    def live_figures(self, deployment):
        """Totals from the runtime (its URL, all versions; a version's page: the deployment's)."""
        root = deployment.root if deployment.pk else None
        if root is None or root.target != Deployment.Target.LOCAL:
            return "from CloudWatch for aws deployments" if root else ""
        try:
            found = client.figures(root.public_id, timeout=1.0).get(str(root.public_id))
        except client.RuntimeUnavailable:
            return "figures unavailable: the runtime did not answer"
        if not found:
            return "not called since the runtime started"
        total = found["total"]
        rate = "—" if total["error_rate"] is None else f"{total['error_rate']:.1%}"
        p99 = "—" if total["p99_seconds"] is None else f"{total['p99_seconds'] * 1000:.1f} ms"
        versions = ", ".join(f"v{n}: {v['requests']}" for n, v in sorted(found["versions"].items()))
        return (
            f"{total['requests']} requests since the runtime started ({versions}); last minute: "
            f"{total['requests_per_minute']} requests, error rate {rate}, p99 {p99}"
        )

    def new_version_view(self, request, pk):
        """Upload a new version of a deployment for its owner, checked like the owner's own upload."""
        root = get_object_or_404(Deployment, pk=pk, version_of__isnull=True)
        if not self.has_change_permission(request, root):
            return redirect("admin:index")
        form = VersionForm()
        if request.method == "POST":
            form = VersionForm(request.POST, request.FILES)
            if form.is_valid():
                try:
                    version = form.create_version(root=root)
                except services.VersionRefused as exc:
                    self.message_user(request, str(exc), messages.ERROR)
                else:
                    self.message_user(request, f"{version} queued.", messages.SUCCESS)
                    return redirect("admin:deployments_deployment_change", root.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"New version of {root.name}",
            "form": form,
            "deployment": root,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/deployments/deployment/new_version.html", context)

    @admin.display(description="serving")
    def serving_version(self, deployment):
        if deployment.version_of_id:
            return ""
        serving = f"v{deployment.serving_version().version}"
        if deployment.canary_id:
            return f"{serving} (canary v{deployment.canary.version}: {deployment.canary_percent}%)"
        return serving

    @admin.action(description="Serve the selected versions at their deployment's URL (promote or roll back)")
    def promote(self, request, queryset):
        for version in queryset.select_related("version_of"):
            try:
                services.deployment_version_promote(root=version.root, number=version.version)
            except services.VersionRefused as exc:
                self.message_user(request, f"{version}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{version} now serves {version.root.endpoint_url}.", messages.SUCCESS)

    @admin.action(
        description=f"Canary: send {ADMIN_CANARY_PERCENT}%% of their deployment's requests to the selected versions"
    )
    def canary(self, request, queryset):
        for version in queryset.select_related("version_of"):
            try:
                services.deployment_canary_start(
                    root=version.root, number=version.version, percent=ADMIN_CANARY_PERCENT
                )
            except services.VersionRefused as exc:
                self.message_user(request, f"{version}: {exc}", messages.ERROR)
            else:
                message = f"{version} answers {ADMIN_CANARY_PERCENT}% of the requests to {version.root.endpoint_url}."
                self.message_user(request, message, messages.SUCCESS)

    @admin.action(description="End the canary of the selected deployments (or of the selected canary versions)")
    def end_canary(self, request, queryset):
        for deployment in queryset.select_related("version_of"):
            try:
                number = deployment.version if deployment.version_of_id else None  # a version: if it is the canary
                version = services.deployment_canary_end(root=deployment.root, number=number)
            except services.VersionRefused as exc:
                self.message_user(request, f"{deployment}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{version}: canary ended.", messages.SUCCESS)

    @admin.action(description="Delete selected versions (they stop and their files are deleted; their events stay)")
    def delete_versions(self, request, queryset):
        for version in queryset.select_related("version_of"):
            try:
                summary = services.deployment_version_delete(version=version, by_user=request.user)
            except services.VersionRefused as exc:
                self.message_user(request, f"{version}: {exc}", messages.ERROR)
            except StageError as exc:
                self.message_user(request, f"{version}: deleting failed: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{version} deleted: {summary}.", messages.SUCCESS)

    @admin.action(description="Redeploy the selected deployments")
    def redeploy(self, request, queryset):
        count = 0
        for deployment in queryset:
            if deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.STOPPING):
                try:
                    services.deployment_redeploy(deployment=deployment)
                except services.VersionRefused as exc:
                    self.message_user(request, f"{deployment}: {exc}", messages.ERROR)
                    continue
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


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class UserAdmin(auth_admin.UserAdmin):
    """Django's, saying what to do instead when a user to delete owns deployments (they are PROTECTed)."""

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        if Deployment.objects.filter(owner__in=objs).exists():
            # Listed as protected, which refuses the delete; not as a permission this operator lacks
            # (Django counts one for each protected object whose admin deletes nothing).
            perms_needed.discard(Deployment._meta.verbose_name)
            self.message_user(
                request,
                "A user who owns deployments cannot be deleted: ServeML keeps every deployment, stopped ones "
                "too, with its owner. To close the account, stop their deployments (the Stop action on the "
                "Deployments page) and untick Active on the user.",
                messages.ERROR,
            )
        return deleted, counts, perms_needed, protected


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(admin.ModelAdmin):
    """Read-only: the event log is each deployment's history, written by the pipeline and the
    services alone (an operator's actions are logged there too)."""

    list_display = ["created_at", "deployment", "stage", "level", "message"]
    list_filter = ["level", "stage"]
    search_fields = ["message", "deployment__name", "deployment__public_id"]
    list_select_related = ["deployment"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


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
