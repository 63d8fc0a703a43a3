# paystream in two images from one file:
#   the default target, the processor (`run`): the runtime wheel alone;
#   `--target simulator`: the retailer's third party for a local stack (runtime + tooling wheels).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY tooling ./tooling
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/runtime . \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/tooling ./tooling

FROM python:3.11-slim AS simulator
RUN useradd --create-home --uid 10001 paystream
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/runtime/*.whl /wheels/tooling/*.whl && rm -rf /wheels
USER paystream
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["paystream"]
CMD ["simulator", "--host", "0.0.0.0", "--port", "8080"]

FROM python:3.11-slim AS processor
RUN useradd --create-home --uid 10001 paystream
COPY --from=build /wheels/runtime /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER paystream
# Inside a container the dashboard must listen beyond loopback; set PAYSTREAM_OPERATOR_TOKEN to
# enable replay (without it the processor warns loudly and stays read-only).
ENV PAYSTREAM_WEB_HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)" || exit 1
ENTRYPOINT ["paystream"]
CMD ["run"]
