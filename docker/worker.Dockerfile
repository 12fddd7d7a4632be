# The themis worker (embedding, retrieval, generation with llama.cpp), CPU build.
# Build context: the repository root.
#
# Two stages: compilers are needed to build llama-cpp-python from source, not to run it, so
# only the finished virtualenv reaches the runtime image.

# -- build ---------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS build

# C/C++ toolchain + cmake: llama-cpp-python ships as an sdist and compiles llama.cpp.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends build-essential cmake; \
    rm -rf /var/lib/apt/lists/*

# LLAVA_BUILD=OFF skips the multimodal library we do not use (a shorter build).
# GGML_NATIVE=OFF targets a portable x86-64/arm64 baseline instead of the build machine's CPU,
# so the image runs on hosts other than the one that built it.
ARG CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
ENV CMAKE_ARGS=${CMAKE_ARGS} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies in their own layer, read from pyproject.toml (one list of pins): editing the
# code then does not rebuild llama.cpp (~8 minutes on two cores).
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself (the wheel carries sql/, migrations/ and alembic.ini as resources).
COPY . /src
RUN pip install --no-deps /src

# -- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# llama.cpp's CPU backend uses OpenMP at run time.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends libgomp1; \
    rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv
# The sample corpus the compose stack ingests on start (also inside the installed package).
COPY themis_pg/data/sample_corpus /app/themis_pg/data/sample_corpus

# An unprivileged user; /models is the model cache (a volume in docker-compose.yml: the
# default models are downloaded once, ~200 MB, and verified by sha256 on later starts).
RUN useradd --system --create-home --home-dir /home/themis --shell /usr/sbin/nologin themis \
    && mkdir -p /models && chown themis:themis /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    THEMIS_MODEL_CACHE=/models
USER themis
WORKDIR /app

# `themis worker` serves the job bus until SIGTERM; THEMIS_DSN names the database.
CMD ["themis", "worker"]
