"""What the trusted inspect stage found moves out of `signature`, which keeps only what the
sandboxed probe reported.

- `pickled_sklearn_version` (ServeML's own scan of the file) gets a column of its own.
- `trusted_types`, which deployments made before 0005 kept in `signature` ("module.name"
  strings for skops files, [] otherwise), already has a column: `allowed_globals`, the
  [module, name] pairs the restricted loader imports and skops builds. A row with none
  there gets them from `trusted_types` (a skops type is a module-level class: the name
  is what follows the last dot); then the key is dropped.
"""

from django.db import migrations, models


def forwards(apps, schema_editor):
    Deployment = apps.get_model("deployments", "Deployment")
    for row in Deployment.objects.all().only("pk", "signature", "allowed_globals").iterator():
        signature = dict(row.signature or {})
        if "pickled_sklearn_version" not in signature and "trusted_types" not in signature:
            continue
        fields = {}
        if "pickled_sklearn_version" in signature:
            version = signature.pop("pickled_sklearn_version")
            fields["pickled_sklearn_version"] = version[:64] if isinstance(version, str) else ""
        legacy = signature.pop("trusted_types", None)
        if not row.allowed_globals and isinstance(legacy, list):
            pairs = [name.rsplit(".", 1) for name in legacy if isinstance(name, str) and "." in name]
            fields["allowed_globals"] = sorted(pairs)
        Deployment.objects.filter(pk=row.pk).update(signature=signature, **fields)


def backwards(apps, schema_editor):
    Deployment = apps.get_model("deployments", "Deployment")
    for row in Deployment.objects.exclude(pickled_sklearn_version=None).only("pk", "signature").iterator():
        signature = {**(row.signature or {}), "pickled_sklearn_version": row.pickled_sklearn_version or None}
        Deployment.objects.filter(pk=row.pk).update(signature=signature)


class Migration(migrations.Migration):
    dependencies = [
        ("deployments", "0006_claim_lease_and_progress"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="pickled_sklearn_version",
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.RunPython(forwards, backwards),
    ]
