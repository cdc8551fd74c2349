"""The REST API of DESIGN.md's "Contracts": token, deploy, list, detail, delete.

Its OpenAPI document (`/api/schema`, drf-spectacular) is generated from these views:
the serializers and `extend_schema` below describe every answer, errors included.
"""

from django.http import Http404, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from deployments import openapi, services, signin
from deployments.forms import VersionForm
from deployments.models import Deployment, DeploymentEvent
from deployments.pipeline.errors import StageError
from deployments.views import bound_form


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeploymentEvent
        fields = ["stage", "level", "message", "duration_ms", "created_at"]


class DeploymentSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="public_id")
    status_url = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = ["id", "name", "target", "status", "stage", "endpoint_url", "error", "status_url", "created_at"]

    @extend_schema_field(OpenApiTypes.URI)
    def get_status_url(self, deployment) -> str:
        return self.context["request"].build_absolute_uri(f"/api/deployments/{deployment.public_id}")


class SignatureSerializer(serializers.Serializer):
    """What the sandboxed probe reported about the model (deployments/signatures.py); empty until validate ran."""

    model_type = serializers.CharField(required=False, help_text="The estimator's class name.")
    estimator = serializers.CharField(required=False, help_text="module.Class")
    steps = serializers.ListField(child=serializers.CharField(), required=False)
    n_features_in = serializers.IntegerField(required=False, allow_null=True)
    feature_names_in = serializers.ListField(
        child=serializers.CharField(), required=False, allow_null=True, help_text="For a model fitted on a DataFrame."
    )
    classes = serializers.ListField(child=serializers.JSONField(), required=False, allow_null=True)
    methods = serializers.ListField(
        child=serializers.ChoiceField(["predict", "predict_proba", "decision_function"]), required=False
    )
    sklearn_version = serializers.CharField(required=False)
    python_version = serializers.CharField(required=False)
    input = serializers.ChoiceField(["numbers", "records", "text"], required=False, allow_null=True)
    example_outputs = serializers.DictField(required=False, allow_null=True)
    pickled_sklearn_version = serializers.CharField(
        required=False, allow_null=True, help_text="The scikit-learn version recorded in the model file."
    )


class VersionSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="public_id")
    promote = serializers.SerializerMethodField()
    serving = serializers.SerializerMethodField()
    canary_percent = serializers.SerializerMethodField()
    shadowed = serializers.SerializerMethodField()
    status_url = serializers.SerializerMethodField()
    deleted_at = serializers.DateTimeField(
        read_only=True,
        allow_null=True,  # so the schema says nullable, as the answer is for every version not deleted
        help_text="When it was deleted (its files are gone; its row and events stay); null if not.",
    )

    class Meta:
        model = Deployment
        fields = [
            "id",
            "version",
            "status",
            "stage",
            "error",
            "promote",
            "serving",
            "canary_percent",
            "shadowed",
            "status_url",
            "created_at",
            "deleted_at",
        ]

    def get_promote(self, version) -> str:
        return "auto" if version.auto_promote else "review"

    def get_serving(self, version) -> bool:
        """Whether the deployment's stable URL answers with this version."""
        return version.serving_version().pk == version.pk

    def get_shadowed(self, version) -> bool:
        """Whether it also predicts a sample of the live requests, compared with the serving version."""
        return version.root.shadow_id == version.pk

    def get_canary_percent(self, version) -> int | None:
        """The percent of the stable URL's requests it answers as a canary; null when it is not one."""
        root = version.root
        return root.canary_percent if root.canary_id == version.pk else None

    @extend_schema_field(OpenApiTypes.URI)
    def get_status_url(self, version) -> str:
        return self.context["request"].build_absolute_uri(f"/api/deployments/{version.public_id}")


class VersionUploadSerializer(serializers.Serializer):
    model_file = serializers.FileField(help_text="model.pkl (pickle), a joblib file, or a .skops file.")
    requirements_file = serializers.FileField(help_text="requirements.txt, e.g. `scikit-learn==1.5.2`.")
    promote = serializers.ChoiceField(
        choices=["auto", "review"],
        required=False,
        help_text="`auto` (default): serve it as soon as it is ready; `review`: wait for a promote call.",
    )


class DeploymentDetailSerializer(DeploymentSerializer):
    events = EventSerializer(many=True)
    signature = serializers.SerializerMethodField()

    class Meta(DeploymentSerializer.Meta):
        fields = DeploymentSerializer.Meta.fields + [
            "is_private",
            "signature",
            "example_request",
            "model_sha256",
            "events",
        ]

    @extend_schema_field(SignatureSerializer)
    def get_signature(self, deployment) -> dict:
        """What the probe reported (read back through ModelSignature), with the scikit-learn
        version the inspect stage read from the file, once it has."""
        signature = deployment.model_signature.as_json()
        if deployment.pickled_sklearn_version is not None:
            signature["pickled_sklearn_version"] = deployment.pickled_sklearn_version or None
        return signature


# ------------------------------------------------------------------ what the schema says


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="What went wrong, written for a person, and what to do.")


class UploadErrorSerializer(ErrorSerializer):
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), help_text="Each refused field's messages."
    )


class ThrottledSerializer(ErrorSerializer):
    retry_after = serializers.IntegerField(help_text="Seconds until sign-in may be tried again.")


class CredentialsSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField()


class DeployUploadSerializer(serializers.Serializer):
    model_file = serializers.FileField(help_text="model.pkl (pickle), a joblib file, or a .skops file.")
    requirements_file = serializers.FileField(help_text="requirements.txt, e.g. `scikit-learn==1.5.2`.")
    name = serializers.CharField(required=False, max_length=100, allow_blank=True)
    target = serializers.ChoiceField(choices=Deployment.Target.choices, required=False)


class NewKeySerializer(serializers.Serializer):
    name = serializers.CharField(required=False, allow_blank=True, help_text="Cut to 100 characters; `key` if empty.")


NOT_SIGNED_IN = OpenApiResponse(ErrorSerializer, description="No valid `Authorization: Token <key>` (or session).")
NOT_YOURS = OpenApiResponse(ErrorSerializer, description="No deployment with this id belongs to you.")


def exception_handler(exc, context):
    """DRF's own errors in the API's one error shape, `{"error": "..."}`."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound("No deployment with this id is yours. `GET /api/deployments` lists yours.")
    response = drf_exception_handler(exc, context)
    if response is not None:
        data = response.data
        if isinstance(data, dict) and set(data) == {"detail"}:
            response.data = {"error": str(data["detail"])}
        else:
            response.data = {"error": "The request is not valid.", "fields": data}
    return response


# ------------------------------------------------------------------ views


class TokenView(ObtainAuthToken):
    """POST username and password (form or JSON) -> {"token": "..."}; 429 with when to retry
    once failed attempts locked the account or the address (deployments/signin.py)."""

    @extend_schema(
        operation_id="token_create",
        summary="Exchange a username and password for an API token",
        request={"application/json": CredentialsSerializer, "application/x-www-form-urlencoded": CredentialsSerializer},
        responses={
            200: inline_serializer("TokenResponse", {"token": serializers.CharField()}),
            400: OpenApiResponse(ErrorSerializer, description="Wrong username or password."),
            429: OpenApiResponse(ThrottledSerializer, description="Too many failed attempts: see Retry-After."),
        },
        auth=[],
    )
    def post(self, request, *args, **kwargs):
        serializer = self.serializer_class(data=request.data, context={"request": request})
        if not serializer.is_valid():
            # django-axes marks DRF's request, which its middleware never sees: answer the lock here.
            if getattr(request, "axes_locked_out", False):
                username = request.data.get("username") if hasattr(request.data, "get") else None
                return signin.throttled_response(request, credentials={"username": username})
            return Response(
                {"error": "Unable to sign in with that username and password."}, status=status.HTTP_400_BAD_REQUEST
            )
        return super().post(request, *args, **kwargs)


obtain_token = TokenView.as_view()


class DeployView(APIView):
    @extend_schema(
        operation_id="deploy",
        summary="Upload a model and its requirements.txt; the pipeline deploys it",
        request={"multipart/form-data": DeployUploadSerializer},
        responses={
            202: DeploymentSerializer,
            400: OpenApiResponse(UploadErrorSerializer, description="The upload was refused; `error` says why."),
            401: NOT_SIGNED_IN,
        },
    )
    def post(self, request):
        # The form reads Django's own request: its upload handlers enforce the size limit
        # while the body streams in, before DRF's parsers would have read it whole.
        form = bound_form(request._request)
        if not form.is_valid():
            errors = {field: [str(e) for e in errs] for field, errs in form.errors.items()}
            first = next(iter(errors.values()))[0]
            return Response({"error": first, "fields": errors}, status=status.HTTP_400_BAD_REQUEST)
        deployment = form.create_deployment(owner=request.user)
        return Response(DeploymentSerializer(deployment, context={"request": request}).data, status=202)


class DeploymentListView(APIView):
    @extend_schema(
        operation_id="deployments_list",
        summary="Your deployments",
        responses={200: DeploymentSerializer(many=True), 401: NOT_SIGNED_IN},
    )
    def get(self, request):
        deployments = request.user.deployments.filter(version_of__isnull=True)  # versions: .../versions
        return Response(DeploymentSerializer(deployments, many=True, context={"request": request}).data)


class DeploymentDetailView(APIView):
    def get_object(self, request, public_id) -> Deployment:
        return get_object_or_404(Deployment, public_id=public_id, owner=request.user)

    @extend_schema(
        operation_id="deployment_retrieve",
        summary="A deployment: status, stage, URL, signature and its event log",
        responses={200: DeploymentDetailSerializer, 401: NOT_SIGNED_IN, 404: NOT_YOURS},
    )
    def get(self, request, public_id):
        deployment = self.get_object(request, public_id)
        return Response(DeploymentDetailSerializer(deployment, context={"request": request}).data)

    @extend_schema(
        operation_id="deployment_stop",
        summary="Stop a deployment (local: at once; aws: `stopping` while its resources are deleted)",
        responses={
            200: OpenApiResponse(DeploymentDetailSerializer, description="Stopped (or already terminal)."),
            202: OpenApiResponse(DeploymentDetailSerializer, description="aws: `stopping`; poll `status_url`."),
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
            409: OpenApiResponse(ErrorSerializer, description="Still deploying: stop it once it is ready or failed."),
            502: OpenApiResponse(ErrorSerializer, description="The runtime could not be told to stop it."),
        },
    )
    def delete(self, request, public_id):
        deployment = self.get_object(request, public_id)
        if deployment.version_of_id:
            return Response(
                {"error": "This is a version of a deployment: it stops with the deployment, not on its own."},
                status=status.HTTP_409_CONFLICT,
            )
        if deployment.status in (Deployment.Status.QUEUED, Deployment.Status.DEPLOYING):
            return Response(
                {"error": "This deployment is still deploying; stop it once it is ready or failed."},
                status=status.HTTP_409_CONFLICT,
            )
        if deployment.can_stop():
            try:
                services.deployment_request_stop(deployment=deployment)
            except StageError as exc:
                return Response({"error": f"Stopping failed: {exc}"}, status=status.HTTP_502_BAD_GATEWAY)
        # An aws deployment is `stopping` while a worker deletes its resources: poll status_url.
        code = status.HTTP_202_ACCEPTED if deployment.status == Deployment.Status.STOPPING else status.HTTP_200_OK
        return Response(DeploymentDetailSerializer(deployment, context={"request": request}).data, status=code)


class DeploymentKeysView(APIView):
    """POST {"name"} creates a key; the answer is the only time it is shown, with whether calls need one."""

    @extend_schema(
        operation_id="deployment_key_create",
        request={"application/json": NewKeySerializer},
        responses={
            201: inline_serializer(
                "CreatedKey",
                {
                    "id": serializers.IntegerField(),
                    "name": serializers.CharField(),
                    "key": serializers.CharField(help_text="Shown this once only."),
                    "private": serializers.BooleanField(help_text="Whether calls now need a key."),
                },
            ),
            400: OpenApiResponse(ErrorSerializer, description="The body is not an object with a text `name`."),
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
            409: OpenApiResponse(ErrorSerializer, description="No more keys can be created for it."),
        },
    )
    def post(self, request, public_id):
        deployment = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        # A JSON body may be any value: only an object with a string name (or none) is a request.
        name = request.data.get("name", "") if hasattr(request.data, "get") else None
        if not isinstance(name, str):
            return Response(
                {"error": 'Send the new key\'s name as a string, e.g. {"name": "ci"}, or no body at all.'},
                status=status.HTTP_400_BAD_REQUEST,
            )
        if "\x00" in name:  # PostgreSQL stores no NUL in text: refused here, not a 500 there
            return Response(
                {"error": "The key's name contains a NUL character: use printable text."},
                status=status.HTTP_400_BAD_REQUEST,
            )
        try:
            key, raw = services.deployment_key_create(deployment=deployment, name=name)
        except services.KeyRefused as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        # Whether calls now need a key: a first key makes a public deployment private, a later one
        # leaves the owner's choice alone (see services.deployment_key_create).
        deployment.refresh_from_db(fields=["is_private"])
        return Response({"id": key.pk, "name": key.name, "key": raw, "private": deployment.is_private}, status=201)

    @extend_schema(
        operation_id="deployment_keys_list",
        responses={
            200: inline_serializer(
                "Key",
                {
                    "id": serializers.IntegerField(),
                    "name": serializers.CharField(),
                    "hint": serializers.CharField(),
                    "created_at": serializers.DateTimeField(),
                },
                many=True,
            ),
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
        },
    )
    def get(self, request, public_id):
        deployment = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        keys = deployment.active_keys()
        return Response([{"id": k.pk, "name": k.name, "hint": k.hint, "created_at": k.created_at} for k in keys])


class DeploymentVersionsView(APIView):
    """A deployment's versions: list them, or upload the next one."""

    @extend_schema(
        operation_id="deployment_versions_list",
        summary="A deployment's versions, newest first, and which one serves its URL",
        responses={200: VersionSerializer(many=True), 401: NOT_SIGNED_IN, 404: NOT_YOURS},
    )
    def get(self, request, public_id):
        root = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        return Response(VersionSerializer(root.all_versions(), many=True, context={"request": request}).data)

    @extend_schema(
        operation_id="deployment_version_create",
        summary="Upload a new version; the current one serves until it is ready and promoted",
        request={"multipart/form-data": VersionUploadSerializer},
        responses={
            202: VersionSerializer,
            400: OpenApiResponse(UploadErrorSerializer, description="The upload was refused; `error` says why."),
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
            409: OpenApiResponse(ErrorSerializer, description="The deployment takes no version now (see `error`)."),
        },
    )
    def post(self, request, public_id):
        root = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        form = bound_form(request._request, VersionForm)
        if not form.is_valid():
            errors = {field: [str(e) for e in errs] for field, errs in form.errors.items()}
            first = next(iter(errors.values()))[0]
            return Response({"error": first, "fields": errors}, status=status.HTTP_400_BAD_REQUEST)
        try:
            version = form.create_version(root=root)
        except services.VersionRefused as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(VersionSerializer(version, context={"request": request}).data, status=202)


def caller_root(request, public_id) -> Deployment:
    """The caller's own deployment (404 otherwise), whose versions the version actions act on."""
    return get_object_or_404(Deployment, public_id=public_id, owner=request.user)


def version_answer(request, action, *, refresh: bool = False, **arguments) -> Response:
    """Run a version action of services (promote, canary, shadow: start or end) and answer the
    version it acted on; VersionRefused is a 409 with its message. `refresh` re-reads the version
    before answering, for the actions that change the root rather than the version they return."""
    try:
        version = action(**arguments)
    except services.VersionRefused as exc:
        return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
    if refresh:
        version.refresh_from_db()
    return Response(VersionSerializer(version, context={"request": request}).data)


def version_action_schema(operation_id: str, summary: str, *, conflict: str, request=None, bad_request: str = ""):
    """The OpenAPI description of a version action: it answers the version, or 409 with why not."""
    refused = {400: OpenApiResponse(ErrorSerializer, description=bad_request)} if bad_request else {}
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        request=request,
        responses={
            200: VersionSerializer,
            **refused,
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
            409: OpenApiResponse(ErrorSerializer, description=conflict),
        },
    )


class DeploymentVersionPromoteView(APIView):
    @version_action_schema(
        "deployment_version_promote",
        "Serve this version at the deployment's URL: promote a new one, or roll back to an earlier one",
        conflict="It cannot serve now: not ready, or no such version.",
    )
    def post(self, request, public_id, number):
        root = caller_root(request, public_id)
        return version_answer(request, services.deployment_version_promote, refresh=True, root=root, number=number)


class CanarySerializer(serializers.Serializer):
    percent = serializers.IntegerField(
        min_value=1, max_value=50, help_text="The percent of the stable URL's requests this version answers (1-50)."
    )


class DeploymentVersionCanaryView(APIView):
    @version_action_schema(
        "deployment_version_canary",
        "Canary: this ready version answers a percent of the deployment's requests, the serving one the rest",
        conflict="It cannot be a canary now (see `error`).",
        request=CanarySerializer,
        bad_request="`percent` is missing or not 1 to 50.",
    )
    def post(self, request, public_id, number):
        root = caller_root(request, public_id)
        body = CanarySerializer(data=request.data)
        if not body.is_valid():
            return Response({"error": "send `percent`, a whole number from 1 to 50"}, status=400)
        percent = body.validated_data["percent"]
        return version_answer(request, services.deployment_canary_start, root=root, number=number, percent=percent)

    @version_action_schema(
        "deployment_version_canary_end",
        "End this version's canary: the serving version answers every request again",
        conflict="This version is not a canary.",
    )
    def delete(self, request, public_id, number):
        root = caller_root(request, public_id)
        return version_answer(request, services.deployment_canary_end, refresh=True, root=root, number=number)


class DeploymentVersionShadowView(APIView):
    @version_action_schema(
        "deployment_version_shadow",
        "Shadow: this ready version also predicts a sample of the live requests, compared with the serving one",
        conflict="It cannot be shadowed now (see `error`).",
    )
    def post(self, request, public_id, number):
        root = caller_root(request, public_id)
        return version_answer(request, services.deployment_shadow_start, root=root, number=number)

    @version_action_schema(
        "deployment_version_shadow_end",
        "Stop shadowing this version",
        conflict="This version is not shadowed.",
    )
    def delete(self, request, public_id, number):
        root = caller_root(request, public_id)
        return version_answer(request, services.deployment_shadow_end, refresh=True, root=root, number=number)


class DeploymentVersionView(APIView):
    @extend_schema(
        operation_id="deployment_version_delete",
        summary="Delete a version: it stops (local: at once; aws: `stopping` while its Lambda version is deleted) "
        "and its files are deleted; its row and events stay",
        responses={
            200: OpenApiResponse(VersionSerializer, description="Deleted: `stopped`, with `deleted_at` (or was)."),
            202: OpenApiResponse(VersionSerializer, description="aws: `stopping`; poll `status_url`."),
            401: NOT_SIGNED_IN,
            404: OpenApiResponse(
                ErrorSerializer, description="No deployment with this id is yours, or no such version."
            ),
            409: OpenApiResponse(
                ErrorSerializer,
                description="Not deletable now: version 1 (stop the deployment instead), the version serving its URL, "
                "the canary, the shadowed one, or one still deploying.",
            ),
            502: OpenApiResponse(ErrorSerializer, description="The runtime could not be told to stop it."),
        },
    )
    def delete(self, request, public_id, number):
        root = caller_root(request, public_id)
        if root.version_of_id:
            return Response(
                {"error": "Delete versions through the deployment itself: /api/deployments/<its id>/versions/<n>."},
                status=status.HTTP_409_CONFLICT,
            )
        version = services.deployment_version_get(root=root, number=number)
        if version is None:
            return Response({"error": f"This deployment has no version {number}."}, status=status.HTTP_404_NOT_FOUND)
        try:
            services.deployment_version_delete(version=version, by_user=request.user)
        except services.VersionRefused as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        except StageError as exc:
            return Response({"error": f"Stopping failed: {exc}"}, status=status.HTTP_502_BAD_GATEWAY)
        version.refresh_from_db()
        # As DELETE on a deployment: aws is `stopping` while a worker deletes its Lambda version.
        code = status.HTTP_202_ACCEPTED if version.status == Deployment.Status.STOPPING else status.HTTP_200_OK
        return Response(VersionSerializer(version, context={"request": request}).data, status=code)


class DeploymentOpenAPIView(APIView):
    """The OpenAPI document of the deployment's prediction URL (deployments/openapi.py)."""

    @extend_schema(
        operation_id="deployment_openapi",
        summary="The OpenAPI 3 document of this deployment's prediction URL, from its model's signature",
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="An OpenAPI 3.0 document."),
            401: NOT_SIGNED_IN,
            404: NOT_YOURS,
            409: OpenApiResponse(ErrorSerializer, description="No prediction URL yet: wait until it is ready."),
        },
    )
    def get(self, request, public_id):
        deployment = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        document = openapi.deployment_document(deployment)
        if document is None:
            return Response(
                {"error": "This deployment has no prediction URL yet: its document exists once it is ready."},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(document)


@csrf_exempt  # it changes nothing, so a POST needs no CSRF token to be told 404
def not_found(request, *args, **kwargs):
    """Any other URL under /api/ (a malformed id included): JSON like the rest of the API, not an HTML page."""
    return JsonResponse(
        {"error": "No API endpoint answers at this URL: check the path and the id (the endpoints are at /api/docs)."},
        status=404,
    )
