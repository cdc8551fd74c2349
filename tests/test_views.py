import pytest
from django.test import override_settings
from django.urls import reverse

from deployments.models import Deployment
from tests.conftest import recorded_posts

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


def test_the_list_shows_only_the_users_own_deployments(client, user, other_user, make_deployment):
    make_deployment(user, name="mine-model")
    make_deployment(other_user, name="their-model")
    client.force_login(user)
    page = client.get(reverse("deployment-list")).content.decode()
    assert "mine-model" in page and "their-model" not in page


def test_another_users_status_page_fragment_and_stop_are_404(client, user, other_user, make_deployment):
    theirs = make_deployment(other_user)
    Deployment.objects.filter(pk=theirs.pk).update(status=Deployment.Status.READY)
    client.force_login(user)
    for name in ("deployment-detail", "deployment-status"):
        assert client.get(reverse(name, args=[theirs.public_id])).status_code == 404
    assert client.post(reverse("deployment-stop", args=[theirs.public_id])).status_code == 404
    assert client.post(reverse("deployment-try", args=[theirs.public_id]), {"body": "{}"}).status_code == 404
    theirs.refresh_from_db()
    assert theirs.status == Deployment.Status.READY


def test_the_status_fragment_polls_until_the_deployment_is_terminal(client, user, make_deployment):
    deployment = make_deployment(user)
    client.force_login(user)
    url = reverse("deployment-status", args=[deployment.public_id])
    assert 'hx-trigger="every 1s"' in client.get(url).content.decode()
    Deployment.objects.filter(pk=deployment.pk).update(
        status=Deployment.Status.FAILED,
        stage="inspect",
        error="requirements pin scikit-learn 1.3.0 but the model was saved with 1.5.2",
    )
    fragment = client.get(url).content.decode()
    assert "hx-trigger" not in fragment
    assert "requirements pin scikit-learn 1.3.0 but the model was saved with 1.5.2" in fragment
    assert "failed in the inspect stage" in fragment


def test_the_ready_page_shows_the_url_a_curl_example_and_the_try_it_form(client, user, make_deployment):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(
        status=Deployment.Status.READY,
        endpoint_url="http://127.0.0.1:8001/predict/x",
        example_request={"data": [0.0, 0.0, 0.0, 0.0]},
        signature={"model_type": "RandomForestClassifier", "n_features_in": 4, "methods": ["predict"]},
    )
    client.force_login(user)
    page = client.get(deployment.get_absolute_url()).content.decode()
    assert "curl -X POST http://127.0.0.1:8001/predict/x" in page
    assert "{&quot;data&quot;: [0.0, 0.0, 0.0, 0.0]}" in page
    assert 'id="try-form"' in page and "Stop deployment" in page


def test_sign_up_creates_an_account_and_signs_in(client):
    response = client.post(
        reverse("signup"),
        {
            "username": "newcomer",
            "password1": "a-long-pass-phrase-9",
            "password2": "a-long-pass-phrase-9",
        },
    )
    assert response.status_code == 302
    assert client.get(reverse("deployment-list")).status_code == 200


@override_settings(SERVEML_ALLOW_SIGNUP=False)
def test_sign_up_can_be_switched_off(client):
    assert client.get(reverse("signup")).status_code == 404
    assert "Sign up" not in client.get(reverse("login")).content.decode()


def test_pages_need_a_signed_in_user(client):
    response = client.get(reverse("deployment-list"))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_operators_see_deployments_in_the_admin_and_can_stop_them(admin_client, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.runtime.client.unload", lambda public_id: None)
    deployment = make_deployment(user, name="operated")
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    changelist = admin_client.get("/admin/deployments/deployment/?q=operated&status__exact=ready")
    assert "operated" in changelist.content.decode()
    change = admin_client.get(f"/admin/deployments/deployment/{deployment.pk}/change/").content.decode()
    assert "queued for the local target" in change  # events inline
    admin_client.post("/admin/deployments/deployment/", {"action": "stop", "_selected_action": [deployment.pk]})
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.STOPPED


def test_operators_can_redeploy_from_the_admin(admin_client, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.runtime.client.unload", lambda public_id: None)
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.FAILED, error="boom")
    admin_client.post("/admin/deployments/deployment/", {"action": "redeploy", "_selected_action": [deployment.pk]})
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.QUEUED and deployment.error == ""
    assert deployment.events.last().message == "redeploy requested"


@pytest.mark.django_db(transaction=True)
def test_a_redeploy_calls_the_runtime_only_after_its_transaction_committed(user, make_deployment, monkeypatch):
    from django.db import connection, transaction

    from deployments import services

    happened = []

    def unload(public_id):  # a runtime that hangs here must not hold a database transaction
        status = Deployment.objects.get(public_id=public_id).status
        happened.append(("runtime unload", connection.in_atomic_block, status))

    monkeypatch.setattr("deployments.runtime.client.unload", unload)
    # As services._enqueue does: the task is sent once the transaction commits.
    monkeypatch.setattr(services, "_enqueue", lambda d: transaction.on_commit(lambda: happened.append(("task sent",))))
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    happened.clear()  # the upload's own task
    services.deployment_redeploy(deployment=Deployment.objects.get(pk=deployment.pk))
    # Outside any transaction, with the row already committed as queued (so the runtime
    # will not load the old build again), and before the task is sent.
    assert happened == [("runtime unload", False, Deployment.Status.QUEUED), ("task sent",)]


def test_a_new_api_key_is_shown_once_and_only_its_digest_is_kept(client, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.runtime.client.refresh_quietly", lambda public_id: None)
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    client.force_login(user)
    page = client.post(reverse("deployment-key-create", args=[deployment.public_id]), {"name": "ci"}).content.decode()
    key = page.split('<pre id="new-key">')[1].split("</pre>")[0]
    assert key.startswith("sml_") and len(key) > 40
    stored = deployment.keys.get()
    from deployments.services import key_digest

    assert stored.key_sha256 == key_digest(key) and key not in str(stored.__dict__)
    again = client.get(deployment.get_absolute_url()).content.decode()
    assert key not in again and stored.hint in again
    deployment.refresh_from_db()
    assert deployment.is_private


def test_the_owner_switches_between_public_and_private(client, user, make_deployment, monkeypatch):
    monkeypatch.setattr("deployments.runtime.client.refresh_quietly", lambda public_id: None)
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.READY)
    client.force_login(user)
    url = reverse("deployment-access", args=[deployment.public_id])
    client.post(url, {"private": "1"})
    deployment.refresh_from_db()
    assert not deployment.is_private  # no key yet: private would answer nobody
    client.post(reverse("deployment-key-create", args=[deployment.public_id]), {"name": "k"})
    client.post(url, {"private": "0"})
    deployment.refresh_from_db()
    assert not deployment.is_private
    client.post(url, {"private": "1"})
    deployment.refresh_from_db()
    assert deployment.is_private


def test_the_key_check_compares_digests_in_constant_time():
    import hashlib

    from deployments.runtime.access import Access

    digest = hashlib.sha256(b"sml_right").hexdigest().encode()
    access = Access(private=True, key_digests=frozenset({digest}))
    assert access.allows({b"authorization": b"Bearer sml_right"}, b"internal")
    assert access.allows({b"x-api-key": b"sml_right"}, b"internal")
    assert not access.allows({b"authorization": b"Bearer sml_wrong"}, b"internal")
    assert not access.allows({}, b"internal")
    assert access.allows({b"x-serveml-internal": b"internal"}, b"internal")
    assert Access(private=False).allows({}, b"internal")


def test_the_runtime_stops_model_processes_idle_past_the_timeout(settings):
    from deployments.runtime.app import Runtime

    class Pool:
        def __init__(self, last_used, busy=False):
            self.last_used, self.busy, self.closed = last_used, busy, False

        def close(self):
            self.closed = True

    settings.SERVEML_MODEL_IDLE_SECONDS = 60
    runtime = Runtime(max_processes=1)
    recent, idle, answering = Pool(last_used=1000.0), Pool(last_used=900.0), Pool(last_used=900.0, busy=True)
    runtime.pools = {"recent": recent, "idle": idle, "answering": answering}
    assert runtime.scale_to_zero(now=1030.0) == ["idle"]
    assert idle.closed and not recent.closed and not answering.closed
    assert list(runtime.pools) == ["recent", "answering"]
    settings.SERVEML_MODEL_IDLE_SECONDS = 0
    assert runtime.scale_to_zero(now=10**9) == []


@pytest.fixture
def aws_endpoint(monkeypatch):
    """Every request the try-it form sends, through httpx.MockTransport; the endpoint answers 200."""
    from deployments import views

    return recorded_posts(monkeypatch, views, {"prediction": 0, "model_type": "RandomForestClassifier"})


def test_try_it_on_a_private_aws_endpoint_asks_for_a_key_and_never_sends_the_runtime_token(
    client, user, make_deployment, aws_endpoint
):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(
        target=Deployment.Target.AWS,
        status=Deployment.Status.READY,
        is_private=True,
        endpoint_url="https://abc123.execute-api.us-east-1.amazonaws.com/",
        example_request={"data": [0, 0, 0, 0]},
    )
    client.force_login(user)
    page = client.get(deployment.get_absolute_url()).content.decode()
    assert 'name="key"' in page and "paste one to try it" in page
    url = reverse("deployment-try", args=[deployment.public_id])
    body = '{"data": [0, 0, 0, 0]}'

    asked = client.post(url, {"body": body}).content.decode()
    assert "paste one of its API keys" in asked and aws_endpoint == []  # no call that could only fail with 401

    answered = client.post(url, {"body": body, "key": "sml_abc"}).content.decode()
    assert "HTTP 200" in answered
    [request] = aws_endpoint
    assert str(request.url) == "https://abc123.execute-api.us-east-1.amazonaws.com/"
    assert request.headers["authorization"] == "Bearer sml_abc" and "x-serveml-internal" not in request.headers


def test_try_it_on_a_public_aws_endpoint_sends_no_runtime_token(client, user, make_deployment, aws_endpoint):
    deployment = make_deployment(user)
    Deployment.objects.filter(pk=deployment.pk).update(
        target=Deployment.Target.AWS,
        status=Deployment.Status.READY,
        endpoint_url="https://abc123.execute-api.us-east-1.amazonaws.com/",
    )
    client.force_login(user)
    client.post(reverse("deployment-try", args=[deployment.public_id]), {"body": "{}"})
    [request] = aws_endpoint
    assert "x-serveml-internal" not in request.headers and "authorization" not in request.headers


def test_the_sign_in_page_answers_429_and_says_when_to_try_again_after_too_many_failures(client, user):
    for n in range(30):
        page = client.post(reverse("login"), {"username": "alice", "password": f"guess-{n}"}, REMOTE_ADDR="203.0.113.7")
    assert page.status_code == 429
    text = page.content.decode()
    assert "Too many failed sign-ins for this account or from this address. Try again in 15 minutes." in text
    assert 'name="password"' in text  # the form is still there, for when the time has passed
    assert 0 < int(page["Retry-After"]) <= 15 * 60
    right = client.post(
        reverse("login"), {"username": "alice", "password": "correct-horse-42"}, REMOTE_ADDR="203.0.113.7"
    )
    assert right.status_code == 429 and "_auth_user_id" not in client.session
