# ServeML's own image, for docker-compose.yml: web, worker and runtime all run it.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV SERVEML_DATA_DIR=/data PYTHONUNBUFFERED=1
RUN DJANGO_SECRET_KEY=collectstatic DJANGO_DEBUG=0 python manage.py collectstatic --noinput
EXPOSE 8000 8001
