import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("deployments", "0009_canary"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="shadow",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="deployments.deployment",
            ),
        ),
    ]
