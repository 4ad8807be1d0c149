# The one Keyless image: `keyless operator | broker | agent | token | render`, and the guardrail
# webhooks (`python -m keyless.webhooks`). Build and push it yourself (nothing is published):
#   docker build -t <your-registry>/keyless:0.1.0 . && docker push <your-registry>/keyless:0.1.0
# or without a daemon: buildah bud -t <your-registry>/keyless:0.1.0 . (see tools/build-images.sh).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY operator/ operator/
# keyless/render/schema/ links to these (`keyless render` checks manifests with the CRD and the policy)
COPY crds/ crds/
COPY policies/ policies/
# A self-contained virtualenv, copied whole into the runtime stage (no compilers, no pip there), with
# exactly the dependency versions the tests ran with (constraints.txt).
RUN python -m venv /opt/keyless && /opt/keyless/bin/pip install --no-compile -c constraints.txt . \
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
