from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from deployments import api, views

# The page's forms, under deployments/<id>/.
deployment_pages = [
    path("status", views.deployment_status, name="deployment-status"),
    path("figures", views.deployment_figures, name="deployment-figures"),
    path("stop", views.deployment_stop, name="deployment-stop"),
    path("try", views.deployment_try, name="deployment-try"),
    path("predict.csv", views.deployment_predict_csv, name="deployment-predict-csv"),
    path("keys", views.deployment_key_create, name="deployment-key-create"),
    path("keys/<int:key_id>/revoke", views.deployment_key_revoke, name="deployment-key-revoke"),
    path("access", views.deployment_access, name="deployment-access"),
    path("versions", views.deployment_version_create, name="deployment-version-create"),
    path("versions/<int:number>/promote", views.deployment_version_promote, name="deployment-version-promote"),
    path("versions/<int:number>/canary", views.deployment_version_canary, name="deployment-version-canary"),
    path("canary/end", views.deployment_canary_end, name="deployment-canary-end"),
    path("versions/<int:number>/shadow", views.deployment_version_shadow, name="deployment-version-shadow"),
    path("shadow/end", views.deployment_shadow_end, name="deployment-shadow-end"),
    path("versions/<int:number>/delete", views.deployment_version_delete, name="deployment-version-delete"),
]

# The REST API of one deployment, under api/deployments/<id>/.
deployment_api = [
    path("keys", api.DeploymentKeysView.as_view(), name="api-deployment-keys"),
    path("versions", api.DeploymentVersionsView.as_view(), name="api-versions"),
    path("versions/<int:number>", api.DeploymentVersionView.as_view(), name="api-version"),
    path("versions/<int:number>/promote", api.DeploymentVersionPromoteView.as_view(), name="api-version-promote"),
    path("versions/<int:number>/canary", api.DeploymentVersionCanaryView.as_view(), name="api-version-canary"),
    path("versions/<int:number>/shadow", api.DeploymentVersionShadowView.as_view(), name="api-version-shadow"),
    path("openapi.json", api.DeploymentOpenAPIView.as_view(), name="api-deployment-openapi"),
]

urlpatterns = [
    path("", views.deployment_list, name="deployment-list"),
    path("deployments/new", views.deployment_new, name="deployment-new"),
    path("deployments/<uuid:public_id>", views.deployment_detail, name="deployment-detail"),
    path("deployments/<uuid:public_id>/", include(deployment_pages)),
    path("signup", views.signup, name="signup"),
    path("health", views.health, name="health"),
    path("api/token", api.obtain_token, name="api-token"),
    path("api/deploy", api.DeployView.as_view(), name="api-deploy"),
    path("api/deployments", api.DeploymentListView.as_view(), name="api-deployments"),
    path("api/deployments/<uuid:public_id>", api.DeploymentDetailView.as_view(), name="api-deployment"),
    path("api/deployments/<uuid:public_id>/", include(deployment_api)),
    path("api/schema", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
