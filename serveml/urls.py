from django.contrib import admin
from django.urls import include, path, re_path

from deployments import api

admin.site.site_header = "ServeML operations"
admin.site.site_title = "ServeML admin"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("deployments.urls")),
    re_path(r"^api/", api.not_found),  # last: only what no API route matched
]
