# paystream: the processor (`run`, the default) and the simulator (`simulator`) in one small image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 paystream
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER paystream
# Inside a container the dashboard must listen beyond loopback; set PAYSTREAM_OPERATOR_TOKEN to
# enable replay (without it the processor warns loudly and stays read-only).
ENV PAYSTREAM_WEB_HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)" || exit 1
ENTRYPOINT ["paystream"]
CMD ["run"]
