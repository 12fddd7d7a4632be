# PostgreSQL 15 with pgvector, PL/Python and themis_pl: the server side of themis-pg.
# Build context: the repository root (docker compose and the test fixtures both use it).
#
# Debian bookworm on purpose: PL/Python embeds the distribution's Python (3.11 on bookworm,
# the version themis_pl is written and tested for), and the image's glibc (hence collation
# order) stays that of the bookworm machines the project is developed on.
ARG BASE_IMAGE=pgvector/pgvector:0.8.0-pg15-bookworm
FROM ${BASE_IMAGE}

# postgresql-plpython3 runs the SQL functions' bodies; python3-psycopg (Debian's build, for
# the system Python) is what those bodies use to open their autonomous bus connection.
# The plpython package must be the server's exact version: ask for it first, so the server
# binaries pgvector was built against stay untouched; the PostgreSQL apt repository keeps only
# the newest minor release, so fall back to that (apt then upgrades the server package with it,
# a minor-release upgrade that pgvector's binary survives).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        "postgresql-plpython3-${PG_MAJOR}=${PG_VERSION}" python3-psycopg \
    || apt-get install -y --no-install-recommends \
        "postgresql-plpython3-${PG_MAJOR}" python3-psycopg; \
    rm -rf /var/lib/apt/lists/*

# The server-side package, where the system Python finds it without PYTHONPATH (local admin
# site-packages of Debian's python3.11).  Only this directory: it needs stdlib + psycopg only.
COPY themis_pg/pl /usr/local/lib/python3.11/dist-packages/themis_pl

# Fail the build, not the first query, if the server's Python cannot import what it needs.
RUN python3 -c "import psycopg, themis_pl; print('themis_pl API', themis_pl.API_VERSION)"

# Who may connect (docker/pg_hba.conf, docker/pg_ident.conf): over the unix socket, peer
# authentication maps OS user postgres to the roles postgres and themis_bus (the SQL functions
# connect back to this server through its socket as themis_bus); every other role, and every
# TCP connection, needs its scram-sha-256 password (postgres: POSTGRES_PASSWORD).
# The files live outside PGDATA and the server is pointed at them with -c hba_file/ident_file
# (CMD below, and docker-compose.yml's command): the pg_hba.conf the entrypoint writes into
# PGDATA at initdb time is never read, neither on a fresh volume nor on one initialised by an
# earlier image.  Owned by root, read-only to the server: code that runs as OS user postgres
# (COPY ... TO PROGRAM) cannot loosen them.
COPY docker/pg_hba.conf docker/pg_ident.conf /etc/themis/
RUN chmod 0755 /etc/themis && chmod 0644 /etc/themis/pg_hba.conf /etc/themis/pg_ident.conf
# initdb's own rules (in PGDATA, used only if the server runs without the -c flags above):
# peer on the socket, scram over TCP, nothing password-less.
ENV POSTGRES_INITDB_ARGS="--auth-local=peer --auth-host=scram-sha-256"

# Server settings themis depends on (docker-compose.yml repeats them where they are tuned):
# - hba_file, ident_file: the authentication rules above;
# - client_connection_check_interval: a PL/Python call whose client disconnected is noticed
#   only through this check, and only if it is in force when the statement starts;
# - max_connections: every calling session holds a second (bus) connection while it waits,
#   so allow about 2 x clients + workers.
CMD ["postgres", \
     "-c", "hba_file=/etc/themis/pg_hba.conf", "-c", "ident_file=/etc/themis/pg_ident.conf", \
     "-c", "client_connection_check_interval=1s", "-c", "max_connections=300"]
