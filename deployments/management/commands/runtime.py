import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand

from deployments.runtime.app import Runtime


class Command(BaseCommand):
    help = "Run the local runtime that answers the prediction URLs of local deployments."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.SERVEML_RUNTIME_HOST)
        parser.add_argument("--port", type=int, default=settings.SERVEML_RUNTIME_PORT)
        parser.add_argument(
            "--processes-per-model",
            type=int,
            default=None,
            help="most model processes one busy deployment may use (default: CPU count - 1)",
        )

    def handle(self, *args, host, port, processes_per_model, **options):
        self.stdout.write(f"ServeML runtime answering prediction URLs on http://{host}:{port}")
        uvicorn.run(
            Runtime(max_processes=processes_per_model),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,  # nothing here reads the client's address
        )
