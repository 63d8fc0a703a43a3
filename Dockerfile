# paystream in two images from one file, built by `make images` (README, "Containers"):
#   --target processor: the processor, the runtime alone;
#   --target simulator: the retailer's third party for a local stack (runtime + tooling).
# Hermetic: every wheel comes from build/wheelhouse, made on the host by `make images`; nothing is
# fetched during the build. BASE is any image with Python 3.11 and its venv module (the wheels are
# built for 3.11): the official slim image, or one made from Debian's archive where no registry
# answers.
ARG BASE=python:3.11-slim

FROM ${BASE} AS install
COPY build/wheelhouse /wheels
# One virtual environment per image, pip and its cache left behind in this stage.
RUN python3 -m venv /opt/paystream \
 && /opt/paystream/bin/pip install --no-index --no-cache-dir --find-links /wheels paystream \
 && python3 -m venv /opt/simulator \
 && /opt/simulator/bin/pip install --no-index --no-cache-dir --find-links /wheels paystream-tooling \
 && for venv in /opt/paystream /opt/simulator; do \
      "$venv/bin/pip" uninstall --quiet --yes pip setuptools 2>/dev/null || true; \
      find "$venv" -name __pycache__ -prune -exec rm -rf {} +; \
    done

FROM ${BASE} AS runtime
RUN useradd --create-home --uid 10001 paystream
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER paystream

FROM runtime AS simulator
COPY --from=install /opt/simulator /opt/simulator
ENV PATH=/opt/simulator/bin:$PATH
EXPOSE 8080
ENTRYPOINT ["paystream"]
CMD ["simulator", "--host", "0.0.0.0", "--port", "8080"]

FROM runtime AS processor
COPY --from=install /opt/paystream /opt/paystream
ENV PATH=/opt/paystream/bin:$PATH
# Inside a container the web server must listen beyond loopback. Payment data and replay need
# PAYSTREAM_OPERATOR_TOKEN (or PAYSTREAM_OPERATOR_TOKEN_FILE, a mounted secret); without one the
# processor serves health and metrics only, and says so.
ENV PAYSTREAM_WEB_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
# SIGTERM (docker stop, podman stop, Kubernetes) drains: the batches in flight finish, their
# offsets are committed, and the process exits 0 within the grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["paystream"]
CMD ["run"]
