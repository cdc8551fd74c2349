"""System checks: `manage.py check` (and every start) says when uploads are not isolated."""

from django.conf import settings
from django.core.checks import Warning, register


@register()
def sandbox_switched_off(app_configs, **kwargs):
    if settings.SERVEML_SANDBOX != "off":
        return []
    return [
        Warning(
            "SERVEML_SANDBOX=off: uploaded models and their packages run WITHOUT isolation on this host.",
            hint="Only for a development machine. Remove SERVEML_SANDBOX (or set it to on) and install bubblewrap.",
            id="serveml.W001",
        )
    ]
