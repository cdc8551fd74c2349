"""The admin never deletes a deployment's row: that would leave its model processes running, its
files on disk and an aws deployment's resources in the account. Operators stop deployments and
delete versions instead (the admin's actions); a user who owns deployments is not deleted either."""

from pathlib import Path

import pytest
from django.urls import reverse

from deployments.models import Deployment
from tests.test_versions import root, runtime  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]
Status = Deployment.Status


def files_of(deployment: Deployment) -> list[Path]:
    return [Path(deployment.model_file.path), Path(deployment.requirements_file.path)]


def assert_untouched(deployment: Deployment, runtime: list) -> None:
    kept = Deployment.objects.get(pk=deployment.pk)
    assert kept.status == Status.READY and kept.deleted_at is None and kept.endpoint_url == deployment.endpoint_url
    assert all(path.is_file() for path in files_of(kept))
    assert runtime == []


def test_the_admin_offers_no_delete_for_a_deployment_but_keeps_stop_and_delete_versions(admin_client, root):
    delete_url = reverse("admin:deployments_deployment_delete", args=[root.pk])
    change = admin_client.get(reverse("admin:deployments_deployment_change", args=[root.pk])).content.decode()
    assert delete_url not in change and 'class="deletelink"' not in change
    changelist = admin_client.get(reverse("admin:deployments_deployment_changelist")).content.decode()
    assert 'value="delete_selected"' not in changelist
    assert 'value="stop"' in changelist and 'value="delete_versions"' in changelist


def test_a_post_to_a_deployments_admin_delete_url_is_refused_and_changes_nothing(admin_client, root, runtime):
    assert all(path.is_file() for path in files_of(root))
    url = reverse("admin:deployments_deployment_delete", args=[root.pk])
    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert_untouched(root, runtime)


def test_the_bulk_delete_action_is_not_run_on_deployments(admin_client, root, runtime):
    changelist = reverse("admin:deployments_deployment_changelist")
    admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [root.pk], "post": "yes"})
    assert_untouched(root, runtime)


def test_deleting_a_user_who_owns_deployments_is_refused_and_says_what_to_do(admin_client, user, root, runtime):
    url = reverse("admin:auth_user_delete", args=[user.pk])
    for response in (admin_client.get(url), admin_client.post(url, {"post": "yes"})):
        page = response.content.decode()
        assert response.status_code == 200 and "protected related objects" in page
        assert reverse("admin:deployments_deployment_change", args=[root.pk]) in page  # the deployment in the way
        assert "stop their deployments" in page and "untick Active" in page
        assert "have permission" not in page  # refused for the deployments, not for the operator's permissions
    assert type(user).objects.filter(pk=user.pk).exists()
    assert_untouched(root, runtime)


def test_the_bulk_delete_of_users_refuses_an_owner_of_deployments(admin_client, user, other_user, root, runtime):
    page = admin_client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "delete_selected", "_selected_action": [user.pk, other_user.pk], "post": "yes"},
    ).content.decode()
    assert "protected related objects" in page and "stop their deployments" in page
    assert type(user).objects.filter(pk__in=[user.pk, other_user.pk]).count() == 2
    assert_untouched(root, runtime)


def test_a_user_without_deployments_is_still_deleted(admin_client, user, other_user, root):
    url = reverse("admin:auth_user_delete", args=[other_user.pk])
    page = admin_client.get(url).content.decode()
    assert "protected related objects" not in page and "stop their deployments" not in page
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302 and response["Location"] == reverse("admin:auth_user_changelist")
    assert not type(other_user).objects.filter(pk=other_user.pk).exists()
    assert Deployment.objects.filter(pk=root.pk, owner=user).exists()


def test_the_event_log_is_read_only_in_the_admin(admin_client, root):
    from deployments import services

    services.deployment_record_event(deployment=root, stage="", message="promoted version 2")
    event = root.events.get(message="promoted version 2")
    listing = admin_client.get(reverse("admin:deployments_deploymentevent_changelist"))
    assert listing.status_code == 200 and "promoted version 2" in listing.content.decode()
    assert "delete_selected" not in listing.content.decode()
    assert admin_client.get(reverse("admin:deployments_deploymentevent_add")).status_code == 403
    delete_url = reverse("admin:deployments_deploymentevent_delete", args=[event.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    change_url = reverse("admin:deployments_deploymentevent_change", args=[event.pk])
    assert admin_client.post(change_url, {"message": "rewritten"}).status_code == 403
    assert root.events.get(pk=event.pk).message == "promoted version 2"
