#!/bin/bash
# Debian's runc and the libseccomp it links, into .runc (ignored by git), for bench/validate_kube_container.py on a
# GPU machine that has neither: carry [".bcc", ".runc"] there. As root here: installs runc if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v runc >/dev/null || apt-get install -y -q runc >/dev/null
mkdir -p .runc
gzip -9 -c "$(command -v runc)" > .runc/runc.gz  # the working tree that travels is 64 MiB at most, .bcc 56
cp -L "$(ldd "$(command -v runc)" | awk '/libseccomp/ {print $3}')" .runc/
grep -qx '/.runc/' .git/info/exclude 2>/dev/null || echo '/.runc/' >> .git/info/exclude
du -sh .runc
