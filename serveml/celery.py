import os

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "serveml.settings")

app = Celery("serveml")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _survive_a_lost_broker() -> None:
    """Keep the worker up when Redis goes away while a task runs.

    On a lost connection, Celery 5.7 first detaches the connection's transport
    (collect()), then still uses its channel: to put the unacknowledged messages
    (the running tasks: acks_late) back, and later to acknowledge them when they
    finish. Each use raised AttributeError, which nothing expects, and the worker
    exited ("Unrecoverable error") instead of reconnecting. Raised as the
    connection error it is, Celery logs it and carries on: Redis keeps those
    messages (it restores them after its visibility timeout) and ServeML's reaper
    re-queues an unfinished deployment long before that (tests/test_faults.py).
    """
    connparams = kombu_redis.Channel._connparams

    def _connparams(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the connection to the broker was closed after it was lost")
        return connparams(self, asynchronous)

    kombu_redis.Channel._connparams = _connparams


_survive_a_lost_broker()
