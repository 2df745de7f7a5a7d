#!/bin/sh
# Remake the stored databases of tests/data/db/schema-N/ with the jmapd.py of an old
# commit (see README.md). Usage, from the repository root:
#   sh tests/data/db/make.sh COMMIT SCHEMA [PYTHON]
# e.g. sh tests/data/db/make.sh d338f22 5 /work/venv-new/bin/python
set -eu
commit=$1; schema=$2; python=${3:-python3}
root=$(pwd)
out="$root/tests/data/db/schema-$schema"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git show "$commit:jmapd.py" > "$work/jmapd.py"
data="$work/data"
jmapd() { "$python" "$work/jmapd.py" "$@" --data-dir "$data" --test-cheap-hashing; }
echo "correct horse battery staple" | jmapd user add alice@example.com --password-stdin
echo "correct horse battery staple" | jmapd user add bob@example.com --password-stdin
jmapd user alias add alice@example.com alias@example.com
jmapd user token add alice@example.com phone > "$work/token.txt"
mkdir "$work/alice" "$work/bob"
for name in 01-plain-ascii 02-alternative 04-mixed-attachments 08-rfc2047-words 28-references; do
    cp "tests/data/mail/$name.eml" "$work/alice/"
done
cp tests/data/mail/17-quoted-printable.eml "$work/bob/"
jmapd import --user alice@example.com "$work/alice"
jmapd import --user bob@example.com "$work/bob"
if [ "$schema" -ge 6 ]; then
    jmapd user share alice@example.com bob@example.com
fi
# Every process has ended, so the WAL is checkpointed and gone; make sure of it.
"$python" -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()" "$data/jmapd.sqlite3"
test ! -e "$data/jmapd.sqlite3-wal"
rm -rf "$out"
mkdir -p "$out"
cp "$data/jmapd.sqlite3" "$out/"
cp -r "$data/blobs" "$out/"
echo "schema-$schema from $commit; the app password of alice@example.com (for manifest.json):"
tail -1 "$work/token.txt"
