import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("deployments", "0008_versions"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="canary",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="deployments.deployment",
            ),
        ),
        migrations.AddField(
            model_name="deployment",
            name="canary_percent",
            field=models.PositiveSmallIntegerField(default=0, editable=False),
        ),
    ]
