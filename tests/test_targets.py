"""The registry of targets: its stages are its modules' functions; a new target is a module and an entry."""

import sys
import types

import pytest

from deployments import services, targets
from deployments.models import Deployment
from deployments.pipeline import runner, stages
from deployments.views import timeline

pytestmark = pytest.mark.django_db


def test_every_target_has_an_entry_whose_stages_its_module_defines():
    assert set(targets.TARGETS) == set(Deployment.Target.values)
    for target in targets.TARGETS.values():
        assert set(target.pipeline()) <= set(Deployment.Stage.values)
        assert target.pipeline()[:4] == ["inspect", "environment", "validate", "package"]
        assert target.pipeline()[-1] == "verify"
        module = target.load()
        assert all(callable(getattr(module, stage)) for stage in target.stages) and callable(module.teardown)


def test_aws_is_configured_only_with_its_region_and_role(settings):
    aws = targets.get("aws")
    settings.SERVEML_AWS_REGION, settings.SERVEML_LAMBDA_ROLE_ARN = "eu-west-1", ""
    assert not aws.is_configured() and targets.get("local").is_configured()
    settings.SERVEML_LAMBDA_ROLE_ARN = "arn:aws:iam::123456789012:role/serveml"
    assert aws.is_configured()


@pytest.fixture
def a_third_target(monkeypatch):
    """A target that is only a module and a registry entry, as a Kubernetes one would be."""
    module = types.ModuleType("tests.k8s_target")
    module.calls = []
    module.build = lambda deployment: module.calls.append(("build", deployment.pk)) or "built"
    module.provision = lambda deployment: module.calls.append(("provision", deployment.pk)) or "provisioned"
    module.teardown = lambda deployment: module.calls.append(("teardown", deployment.pk)) or "deleted"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(
        targets.TARGETS, "k8s", targets.Target(name="k8s", module=module.__name__, stages=("build", "provision"))
    )
    return module


def test_a_third_target_is_a_module_and_a_registry_entry(a_third_target, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.services._enqueue", lambda deployment: None)
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(target="k8s", status=Deployment.Status.READY)
    deployment.refresh_from_db()
    pipeline = runner.PIPELINES["k8s"]
    try:
        assert [stage for stage, _ in pipeline] == [*targets.get("k8s").pipeline()]
        assert pipeline[0][1] is stages.inspect and pipeline[-1][1] is stages.verify
        assert [function(deployment) for _, function in pipeline[4:6]] == ["built", "provisioned"]
    finally:
        del runner.PIPELINES["k8s"]
    assert [row["stage"] for row in timeline(deployment)] == targets.get("k8s").pipeline()
    assert services.deployment_request_stop(deployment=deployment) == "deleted"
    assert a_third_target.calls[-1] == ("teardown", deployment.pk)
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.STOPPED
