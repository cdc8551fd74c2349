"""The REST API of DESIGN.md's "Contracts": token, deploy, list, detail, delete."""

from django.shortcuts import get_object_or_404
from rest_framework import serializers, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.response import Response
from rest_framework.views import APIView

from deployments import services, signin
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

    def get_status_url(self, deployment):
        return self.context["request"].build_absolute_uri(f"/api/deployments/{deployment.public_id}")


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

    def get_signature(self, deployment) -> dict:
        """What the probe reported (read back through ModelSignature), with the scikit-learn
        version the inspect stage read from the file, once it has."""
        signature = deployment.model_signature.as_json()
        if deployment.pickled_sklearn_version is not None:
            signature["pickled_sklearn_version"] = deployment.pickled_sklearn_version or None
        return signature


class TokenView(ObtainAuthToken):
    """POST username and password (form or JSON) -> {"token": "..."}; 429 with when to retry
    once failed attempts locked the account or the address (deployments/signin.py)."""

    def post(self, request, *args, **kwargs):
        serializer = self.serializer_class(data=request.data, context={"request": request})
        if not serializer.is_valid():
            # django-axes marks DRF's request, which its middleware never sees: answer the lock here.
            if getattr(request, "axes_locked_out", False):
                return signin.throttled_response(request, credentials={"username": request.data.get("username")})
            return Response(
                {"error": "Unable to sign in with that username and password."}, status=status.HTTP_400_BAD_REQUEST
            )
        return super().post(request, *args, **kwargs)


obtain_token = TokenView.as_view()


class DeployView(APIView):
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
    def get(self, request):
        deployments = request.user.deployments.all()
        return Response(DeploymentSerializer(deployments, many=True, context={"request": request}).data)


class DeploymentDetailView(APIView):
    def get_object(self, request, public_id) -> Deployment:
        return get_object_or_404(Deployment, public_id=public_id, owner=request.user)

    def get(self, request, public_id):
        deployment = self.get_object(request, public_id)
        return Response(DeploymentDetailSerializer(deployment, context={"request": request}).data)

    def delete(self, request, public_id):
        deployment = self.get_object(request, public_id)
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

    def post(self, request, public_id):
        deployment = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        try:
            key, raw = services.deployment_key_create(deployment=deployment, name=request.data.get("name", ""))
        except services.KeyRefused as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        # Whether calls now need a key: a first key makes a public deployment private, a later one
        # leaves the owner's choice alone (see services.deployment_key_create).
        deployment.refresh_from_db(fields=["is_private"])
        return Response({"id": key.pk, "name": key.name, "key": raw, "private": deployment.is_private}, status=201)

    def get(self, request, public_id):
        deployment = get_object_or_404(Deployment, public_id=public_id, owner=request.user)
        keys = deployment.active_keys()
        return Response([{"id": k.pk, "name": k.name, "hint": k.hint, "created_at": k.created_at} for k in keys])
