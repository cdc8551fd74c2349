# ServeML's own image: web, worker, beat and runtime in docker-compose.yml all run it.
# BASE_IMAGE: a Debian-based image with Python 3.11 (the tests build on a stand-in of their own,
# since nothing can be pulled there).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The model sandbox (deployments/sandbox.py) runs bubblewrap, and util-linux's prlimit, setpriv
# and unshare. apt runs only for what the base image lacks, so a base that has them needs no network.
RUN missing=""; \
    command -v bwrap >/dev/null || missing="bubblewrap"; \
    for tool in prlimit setpriv unshare; do command -v "$tool" >/dev/null || missing="$missing util-linux"; done; \
    if [ -n "$missing" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $missing && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY requirements.txt .
# pip reads these if given: a mirror (PIP_INDEX_URL), or a wheelhouse for a build with no network
# (PIP_NO_INDEX=1 PIP_FIND_LINKS=/path), as the tests do.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN python3 -m venv /opt/serveml && /opt/serveml/bin/pip install --no-cache-dir -r requirements.txt
ENV PATH=/opt/serveml/bin:$PATH SERVEML_DATA_DIR=/data PYTHONUNBUFFERED=1

COPY . .
RUN DJANGO_SECRET_KEY=collectstatic DJANGO_DEBUG=0 python manage.py collectstatic --noinput
# No USER: the worker and the runtime must run as root, to give each deployment's processes a
# uid of their own (docker-compose.yml says what else the sandbox needs from the container).
EXPOSE 8000 8001
