import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from deployments.models import Deployment
from tests.conftest import SKLEARN_PIN

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


@pytest.fixture
def api():
    return APIClient()


def files(model_bytes):
    return {
        "model_file": SimpleUploadedFile("model.pkl", model_bytes),
        "requirements_file": SimpleUploadedFile("requirements.txt", SKLEARN_PIN.encode()),
    }


def test_a_script_gets_a_token_with_form_or_json_credentials(api, user):
    form = api.post("/api/token", {"username": "alice", "password": "correct-horse-42"})
    as_json = api.post("/api/token", {"username": "alice", "password": "correct-horse-42"}, format="json")
    assert form.status_code == 200 and form.json()["token"] == as_json.json()["token"]


def test_wrong_credentials_get_a_message_not_a_token(api, user):
    response = api.post("/api/token", {"username": "alice", "password": "nope"}, format="json")
    assert response.status_code == 400 and "username and password" in response.json()["error"]


def test_deploy_answers_202_with_the_contract_fields(api, user, iris_rf_bytes):
    token = api.post("/api/token", {"username": "alice", "password": "correct-horse-42"}).json()["token"]
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    response = api.post("/api/deploy", {**files(iris_rf_bytes), "name": "iris"}, format="multipart")
    assert response.status_code == 202
    body = response.json()
    assert set(body) >= {"id", "status", "stage", "endpoint_url", "status_url"}
    assert body["status"] == "queued" and body["endpoint_url"] == ""
    assert body["status_url"] == f"http://testserver/api/deployments/{body['id']}"
    assert Deployment.objects.get().name == "iris"


def test_deploy_refuses_a_bad_upload_with_the_reason(api, user):
    api.force_authenticate(user)
    response = api.post("/api/deploy", files(b"not a pickle"), format="multipart")
    assert response.status_code == 400
    assert "not a model file ServeML can read" in response.json()["error"]
    assert "model_file" in response.json()["fields"]
    assert Deployment.objects.count() == 0


def test_the_api_requires_authentication(api):
    assert api.get("/api/deployments").status_code in (401, 403)


def test_detail_has_signature_and_events(api, user, make_deployment):
    deployment = make_deployment(user)
    api.force_authenticate(user)
    body = api.get(f"/api/deployments/{deployment.public_id}").json()
    assert set(body) >= {"id", "name", "status", "stage", "endpoint_url", "error", "signature", "events"}
    assert body["events"][0]["message"] == "queued for the local target"


def test_a_user_never_sees_or_touches_another_users_deployments(api, user, other_user, make_deployment):
    theirs = make_deployment(other_user, name="secret")
    mine = make_deployment(user, name="mine")
    api.force_authenticate(user)
    listed = api.get("/api/deployments").json()
    assert [d["id"] for d in listed] == [str(mine.public_id)]
    assert api.get(f"/api/deployments/{theirs.public_id}").status_code == 404
    theirs.status = Deployment.Status.READY
    theirs.save()
    assert api.delete(f"/api/deployments/{theirs.public_id}").status_code == 404
    theirs.refresh_from_db()
    assert theirs.status == Deployment.Status.READY


def test_delete_stops_a_ready_deployment(api, user, make_deployment, monkeypatch):
    calls = []
    monkeypatch.setattr("deployments.runtime.client.unload", lambda public_id: calls.append(public_id))
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    api.force_authenticate(user)
    response = api.delete(f"/api/deployments/{deployment.public_id}")
    assert response.status_code == 200 and response.json()["status"] == "stopped"
    assert calls == [deployment.public_id]


def test_delete_refuses_a_deployment_still_deploying(api, user, make_deployment):
    deployment = make_deployment(user)
    api.force_authenticate(user)
    response = api.delete(f"/api/deployments/{deployment.public_id}")
    assert response.status_code == 409 and "still deploying" in response.json()["error"]


def test_health_answers(api):
    assert api.get("/health").json() == {"status": "ok"}


def test_a_key_answer_tells_whether_the_endpoint_is_private_after_the_call(api, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.runtime.client.refresh_quietly", lambda public_id: None)
    from deployments import services

    deployment = make_deployment(user)
    api.force_authenticate(user)
    url = f"/api/deployments/{deployment.public_id}/keys"
    first = api.post(url, {"name": "first"}, format="json")
    assert first.status_code == 201 and first.json()["private"] is True  # a first key makes it private
    services.deployment_set_private(deployment=Deployment.objects.get(pk=deployment.pk), private=False)
    second = api.post(url, {"name": "second"}, format="json")
    assert second.status_code == 201 and second.json()["private"] is False  # the owner's choice stands
    assert api.get(f"/api/deployments/{deployment.public_id}").json()["is_private"] is False


# ------------------------------------------------------------------ sign-in throttling

ATTACKER, OTHER_ADDRESS = "203.0.113.7", "198.51.100.20"


def guess(api, username: str, password: str, address: str = ATTACKER):
    return api.post("/api/token", {"username": username, "password": password}, format="json", REMOTE_ADDR=address)


def test_thirty_wrong_passwords_in_a_row_are_throttled_with_when_to_try_again(api, user, settings):
    codes = [guess(api, "alice", f"guess-{n}").status_code for n in range(30)]
    limit = settings.AXES_FAILURE_LIMIT
    assert codes == [400] * (limit - 1) + [429] * (30 - limit + 1)  # the limit-th failure locks
    throttled = guess(api, "alice", "correct-horse-42")  # even the right password, while it lasts
    assert throttled.status_code == 429
    assert throttled.json()["error"] == (
        "Too many failed sign-ins for this account or from this address. Try again in 15 minutes."
    )
    assert 14 * 60 < int(throttled["Retry-After"]) <= 15 * 60 == settings.AXES_COOLOFF_TIME.total_seconds()
    assert throttled.json()["retry_after"] == int(throttled["Retry-After"])


def test_the_right_password_works_again_once_the_cool_off_has_passed(api, user, settings):
    import time
    from datetime import timedelta

    settings.AXES_COOLOFF_TIME = timedelta(seconds=3)
    for n in range(30):
        guess(api, "alice", f"guess-{n}")
    assert guess(api, "alice", "correct-horse-42").status_code == 429
    time.sleep(3.1)
    answer = guess(api, "alice", "correct-horse-42")
    assert answer.status_code == 200 and answer.json()["token"]


def test_failures_lock_their_account_and_their_address_but_not_another_account_elsewhere(api, user, other_user):
    for n in range(30):
        guess(api, "alice", f"guess-{n}")
    # Another account, from another address: not affected.
    assert guess(api, "mallory", "correct-horse-43", address=OTHER_ADDRESS).status_code == 200
    # The policy (README, "Sign-in throttling"): the account is locked wherever its owner
    # signs in from, and the address for every account, until the cool-off has passed.
    assert guess(api, "alice", "correct-horse-42", address=OTHER_ADDRESS).status_code == 429
    assert guess(api, "mallory", "correct-horse-43").status_code == 429


def test_behind_a_trusted_proxy_failures_count_against_the_address_it_saw(api, user, settings):
    settings.SERVEML_TRUSTED_PROXIES = 1
    proxy = "10.0.0.2"
    for n in range(30):  # the client makes up a new address each time, to the left of the proxy's entry
        api.post(
            "/api/token",
            {"username": f"nobody-{n}", "password": "x"},
            format="json",
            REMOTE_ADDR=proxy,
            HTTP_X_FORWARDED_FOR=f"192.0.2.{n}, {ATTACKER}",
        )
    assert guess(api, "alice", "correct-horse-42", address=proxy).status_code == 200  # another client
    locked = api.post(
        "/api/token",
        {"username": "alice", "password": "correct-horse-42"},
        format="json",
        REMOTE_ADDR=proxy,
        HTTP_X_FORWARDED_FOR=ATTACKER,
    )
    assert locked.status_code == 429
