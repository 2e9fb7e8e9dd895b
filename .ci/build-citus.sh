#!/usr/bin/env bash
# Build and install Citus into the Debian PostgreSQL 15 of this machine, for the tests that
# start a Citus cluster (tests/integration/citus/). Usage: build-citus.sh SHARED_CITUS_DIR [PG_CONFIG]
#
# SHARED_CITUS_DIR holds build.sh and the Citus source tarball (../shared/citus beside the
# repository). Citus 13.2.2 defines its own static have_createdb_privilege() for
# PostgreSQL 15, which PostgreSQL 15.18 and later export from commands/dbcommands.h: the
# two clash and the build fails. When the server's header declares the function, build.sh
# runs on a copy of the tarball with Citus's definition removed; otherwise as it is. Either
# way build.sh installs the build packages, and does nothing when Citus is installed.
set -euo pipefail
shared="$(cd "${1:?usage: build-citus.sh SHARED_CITUS_DIR [PG_CONFIG]}" && pwd)"
pg_config="${2:-/usr/lib/postgresql/15/bin/pg_config}"

declares_it() {
    local header
    header="$("$pg_config" --includedir-server 2>/dev/null)/commands/dbcommands.h" || return 1
    [[ -f $header ]] && grep -q 'extern bool have_createdb_privilege' "$header"
}

if ! declares_it; then
    # The header may not be installed yet (build.sh installs it): a plain build first, and
    # the patched one only if the header then turns out to declare the function.
    if "$shared/build.sh" "$pg_config"; then exit 0; fi
    declares_it || exit 1
    echo "the server exports have_createdb_privilege(): building again without Citus's copy"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$shared/build.sh" "$work/"
tarball="$(cd "$shared" && ls citus-*.tar.gz)"
mkdir "$work/src"
tar -xzf "$shared/$tarball" -C "$work/src"
python3 - "$work"/src/citus-*/src/include/pg_version_compat.h <<'PY'
import re
import sys

path = sys.argv[1]
text = open(path).read()
patched = re.sub(r"static inline bool\nhave_createdb_privilege\(void\)\n\{.*?\n\}\n", "", text, count=1, flags=re.S)
if patched == text:
    sys.exit(f"no definition of have_createdb_privilege() in {path}")
open(path, "w").write(patched)
PY
tar -czf "$work/$tarball" -C "$work/src" .
rm -rf "$work/src"
"$work/build.sh" "$pg_config"
