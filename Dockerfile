# Headwater itself (API, router, sources, engine): the image etc/kubernetes/headwater.yaml runs.
#   docker build -t headwater/headwater:0.1.0 .
# Runs as an unprivileged user on a read-only root filesystem: everything Headwater writes lives
# under /var/lib/headwater ([DEFAULT] data_dir, a mounted volume) and /tmp (an emptyDir).
# The runtime images (runtimes/*/Dockerfile) are separate: they run tenant code, this one never does.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY sources ./sources
COPY sinks ./sinks
COPY engine ./engine
COPY runtimes ./runtimes
# One virtualenv with the production extras, copied whole into the final stage (no compiler there).
RUN python -m venv /opt/headwater \
 && /opt/headwater/bin/pip install --no-cache-dir '.[kubernetes,rabbitmq,nats,openstack]'

FROM python:3.11-slim
RUN groupadd --system --gid 10001 headwater \
 && useradd --system --uid 10001 --gid headwater --home-dir /var/lib/headwater --no-create-home headwater \
 && mkdir -p /var/lib/headwater /etc/headwater \
 && chown headwater:headwater /var/lib/headwater \
 && chmod 0700 /var/lib/headwater
COPY --from=build /opt/headwater /opt/headwater
# The local engine's runtime servers, for `[engine] backend = local` in a single-pod set-up.
COPY --from=build /src/runtimes /opt/headwater/runtimes
ENV PATH=/opt/headwater/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/headwater \
    HEADWATER_RUNTIMES_DIR=/opt/headwater/runtimes

USER 10001:10001
WORKDIR /var/lib/headwater
EXPOSE 7070
HEALTHCHECK --interval=20s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7070/healthz', timeout=2)"]
ENTRYPOINT ["headwater"]
CMD ["serve", "--config-file", "/etc/headwater/headwater.conf", "--data-dir", "/var/lib/headwater"]
