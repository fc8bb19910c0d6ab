# One image for every ChatStream role; docker-compose.yml picks the role with `manage.py role <role>`.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --create-home chatstream && mkdir -p var && chown -R chatstream var
USER chatstream
# Inside a container each instance listens on all interfaces of its own network namespace.
ENV CHATSTREAM_BIND=0.0.0.0
CMD ["python", "manage.py", "role", "api"]
