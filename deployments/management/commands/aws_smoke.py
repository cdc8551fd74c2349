"""`make aws-smoke`: deploy the iris model to a real AWS account, call it, tear it down.

Opt-in: it does nothing unless AWS credentials, SERVEML_AWS_REGION and
SERVEML_LAMBDA_ROLE_ARN are set. It runs the pipeline in this process (Celery
eager mode), with the worker-side Docker engine, and always tears down.
"""

import io
import pickle
import time

import boto3
import httpx
import sklearn
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand, CommandError

from deployments import services, targets
from deployments.allowlist import corpus
from deployments.models import Deployment
from serveml.celery import app as celery_app


class Command(BaseCommand):
    help = "Deploy the iris model to real AWS (Lambda + API Gateway), call it, and tear it down."

    def handle(self, *args, **options):
        if boto3.Session().get_credentials() is None or not targets.get(Deployment.Target.AWS).is_configured():
            self.stdout.write(
                "aws-smoke skipped: set AWS credentials, SERVEML_AWS_REGION and SERVEML_LAMBDA_ROLE_ARN to run it."
            )
            return
        celery_app.conf.task_always_eager = True
        model = corpus.random_forest()
        buffer = io.BytesIO()
        pickle.dump(model, buffer)
        owner, _ = get_user_model().objects.get_or_create(username="aws-smoke")
        started = time.monotonic()
        deployment = services.deployment_create(
            owner=owner,
            name="aws smoke test",
            target=Deployment.Target.AWS,
            model_format="pickle",
            model_upload=SimpleUploadedFile("model.pkl", buffer.getvalue()),
            requirements_upload=SimpleUploadedFile(
                "requirements.txt", f"scikit-learn=={sklearn.__version__}\n".encode()
            ),
        )
        deployment.refresh_from_db()
        try:
            for event in deployment.events.all():
                self.stdout.write(f"[{event.stage or '-'}] {event.message.splitlines()[0][:160]}")
            if deployment.status != Deployment.Status.READY:
                raise CommandError(f"deployment failed in {deployment.stage}: {deployment.error}")
            rows = corpus.iris()[0][::30].tolist()
            answer = httpx.post(deployment.endpoint_url, json={"instances": rows}, timeout=60).json()
            if answer.get("predictions") != model.predict(rows).tolist():
                raise CommandError(f"unexpected answer from {deployment.endpoint_url}: {answer}")
            self.stdout.write(
                self.style.SUCCESS(
                    f"ready in {time.monotonic() - started:.0f} s at {deployment.endpoint_url}; predictions match"
                )
            )
        finally:
            self.stdout.write(services.deployment_stop(deployment=deployment))
        self.stdout.write(f"base image {settings.SERVEML_LAMBDA_BASE_IMAGE}")
