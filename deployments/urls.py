from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from deployments import api, views

urlpatterns = [
    path("", views.deployment_list, name="deployment-list"),
    path("deployments/new", views.deployment_new, name="deployment-new"),
    path("deployments/<uuid:public_id>", views.deployment_detail, name="deployment-detail"),
    path("deployments/<uuid:public_id>/status", views.deployment_status, name="deployment-status"),
    path("deployments/<uuid:public_id>/figures", views.deployment_figures, name="deployment-figures"),
    path("deployments/<uuid:public_id>/stop", views.deployment_stop, name="deployment-stop"),
    path("deployments/<uuid:public_id>/try", views.deployment_try, name="deployment-try"),
    path("deployments/<uuid:public_id>/predict.csv", views.deployment_predict_csv, name="deployment-predict-csv"),
    path("deployments/<uuid:public_id>/keys", views.deployment_key_create, name="deployment-key-create"),
    path(
        "deployments/<uuid:public_id>/keys/<int:key_id>/revoke",
        views.deployment_key_revoke,
        name="deployment-key-revoke",
    ),
    path("deployments/<uuid:public_id>/access", views.deployment_access, name="deployment-access"),
    path("deployments/<uuid:public_id>/versions", views.deployment_version_create, name="deployment-version-create"),
    path(
        "deployments/<uuid:public_id>/versions/<int:number>/promote",
        views.deployment_version_promote,
        name="deployment-version-promote",
    ),
    path(
        "deployments/<uuid:public_id>/versions/<int:number>/canary",
        views.deployment_version_canary,
        name="deployment-version-canary",
    ),
    path("deployments/<uuid:public_id>/canary/end", views.deployment_canary_end, name="deployment-canary-end"),
    path(
        "deployments/<uuid:public_id>/versions/<int:number>/shadow",
        views.deployment_version_shadow,
        name="deployment-version-shadow",
    ),
    path("deployments/<uuid:public_id>/shadow/end", views.deployment_shadow_end, name="deployment-shadow-end"),
    path("signup", views.signup, name="signup"),
    path("health", views.health, name="health"),
    path("api/token", api.obtain_token, name="api-token"),
    path("api/deploy", api.DeployView.as_view(), name="api-deploy"),
    path("api/deployments", api.DeploymentListView.as_view(), name="api-deployments"),
    path("api/deployments/<uuid:public_id>", api.DeploymentDetailView.as_view(), name="api-deployment"),
    path("api/deployments/<uuid:public_id>/keys", api.DeploymentKeysView.as_view(), name="api-deployment-keys"),
    path("api/deployments/<uuid:public_id>/versions", api.DeploymentVersionsView.as_view(), name="api-versions"),
    path(
        "api/deployments/<uuid:public_id>/versions/<int:number>/promote",
        api.DeploymentVersionPromoteView.as_view(),
        name="api-version-promote",
    ),
    path(
        "api/deployments/<uuid:public_id>/versions/<int:number>/canary",
        api.DeploymentVersionCanaryView.as_view(),
        name="api-version-canary",
    ),
    path(
        "api/deployments/<uuid:public_id>/versions/<int:number>/shadow",
        api.DeploymentVersionShadowView.as_view(),
        name="api-version-shadow",
    ),
    path(
        "api/deployments/<uuid:public_id>/openapi.json",
        api.DeploymentOpenAPIView.as_view(),
        name="api-deployment-openapi",
    ),
    path("api/schema", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
