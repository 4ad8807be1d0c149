# The one Keyless image: `keyless operator | broker | agent | token | render`, and the guardrail
# webhooks (`python -m keyless.webhooks`). Build: docker build -t ghcr.io/keyless-dev/keyless:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY operator/ operator/
# A self-contained virtualenv, copied whole into the runtime stage (no compilers, no pip there).
RUN python -m venv /opt/keyless && /opt/keyless/bin/pip install --no-compile . \
 && /opt/keyless/bin/python -m compileall -q /opt/keyless/lib

FROM python:3.11-slim
# Non-root, numeric (runAsNonRoot can verify it); the chart uses the same uid.
RUN groupadd --system --gid 65532 keyless \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin keyless
COPY --from=build /opt/keyless /opt/keyless
ENV PATH=/opt/keyless/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["keyless"]
CMD ["--help"]
