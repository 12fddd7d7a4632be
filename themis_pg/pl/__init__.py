"""Server-side package: the code behind the SQL functions, run inside PostgreSQL backends.

It is installed into the server's Python path as ``themis_pl`` (``themis db up`` does this for
the embedded cluster; see the README for other servers), so it imports only the standard
library and psycopg and uses relative imports.  ``API_VERSION`` must match what the installed
SQL functions expect; the migration checks it.
"""

API_VERSION = 3
