# Sourced by the GPU machine's SQL-path runs (sql_path.sh, sql_rag.sh): the wheels and the
# llama.cpp kit from $C, PostgreSQL 15 from the kit with themis_pl on the server's Python path,
# the schema and the function set applied by psql (the machine has no Alembic), and $DSN.
# LOCAL=1 rehearses it here (PG_BIN, no kits).
if [ -z "${LOCAL:-}" ]; then
  pip install -q --no-index --no-deps --target /tmp/site $C/*.whl 2>> "$LOG"
  eval "$(bash $C/gpu-llama-unpack.sh $C)"
  export PYTHONPATH=$PWD:$PWD/bench:/tmp/site:$PYTHONPATH
  tar -C / -xJf $C/pg15-kit.tar.xz
  PG=/opt/pg15/bin
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; date -u; } \
    > "$OUT/gpu.txt"
  PGCONF=${PGCONF:--c shared_buffers=16GB -c max_connections=200 -c max_worker_processes=32 \
-c max_parallel_workers=16 -c max_parallel_maintenance_workers=15}
else
  PG=${PG_BIN:-/usr/lib/postgresql/15/bin}
  export PYTHONPATH=$PWD:$PWD/bench
  PGCONF=${PGCONF:--c max_connections=100}
fi
id pguser > /dev/null 2>&1 || useradd -m pguser
D=/tmp/sqlpath
rm -rf "$D" && mkdir -p "$D/pylib" && cp -r themis_pg/pl "$D/pylib/themis_pl" && chmod -R a+rX "$D"
chown pguser "$D"
su pguser -c "$PG/initdb -D $D/data -U pguser > /dev/null && PYTHONPATH=$D/pylib \
  $PG/pg_ctl -D $D/data -l $D/pg.log -w -o '-p 5433 -k $D $PGCONF' start > /dev/null"
DSN="host=$D port=5433 user=pguser dbname=postgres"
for f in sql/schema_000?.sql sql/api/*.sql; do
  "$PG/psql" -q -v ON_ERROR_STOP=1 "$DSN" -f "$f" >> "$LOG" 2>&1 || echo "SQL $f failed"
done
