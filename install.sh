#!/usr/bin/env bash
# Sets gpuwatch up on a Debian or Ubuntu machine, as root. Safe to run again.
#   ./install.sh           bcc, kernel headers, tracefs, gpuwatch in /opt/gpuwatch/venv, /usr/local/bin/gpuwatch,
#                          the interposer in /opt/gpuwatch/lib/libgpuwatch.so
#   ./install.sh --test    the same plus test tools (pytest, ruff, mypy), then ruff and mypy, then the test suite
#                          from this checkout
#   ./install.sh --lint    only ruff and mypy, from the venv that --test installed (any user)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
PREFIX=/opt/gpuwatch
VENV=$PREFIX/venv
mode=${1:-install}
case "$mode" in install|--test|--lint) ;; *) echo "usage: $0 [--test|--lint]" >&2; exit 2 ;; esac
say() { echo "install.sh: $*"; }

# ruff over everything; mypy over the packages. pyproject maps gpuwatch.X to the folder X/, which mypy cannot
# follow: it reads them through build/mypy/gpuwatch/, links laid out as they are imported.
lint() {
  for tool in ruff mypy; do
    [ -x "$VENV/bin/$tool" ] || { echo "install.sh: no $tool in $VENV: run ./install.sh --test" >&2; return 1; }
  done
  "$VENV/bin/python" - <<'PY'
import os, re
section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?:^\[|\Z)", open("pyproject.toml").read(), re.M | re.S)
os.makedirs("build/mypy", exist_ok=True)
for package, folder in re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section.group(1), re.M):
    link = os.path.join("build/mypy", *package.split("."))
    os.makedirs(os.path.dirname(link), exist_ok=True)  # gpuwatch itself is a namespace package: a plain folder
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(folder, os.path.dirname(link)), link)
PY
  say "ruff check"
  "$VENV/bin/ruff" check --output-format concise . || { echo "install.sh: ruff found problems (above)" >&2; return 1; }
  say "mypy"
  "$VENV/bin/mypy" | sed -e 's#^build/mypy/gpuwatch/##' ||
    { echo "install.sh: mypy found problems (above)" >&2; return 1; }
}
if [ "$mode" = --lint ]; then lint; exit; fi

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo $0 $*)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

packages=(python3 python3-venv python3-pip python3-bpfcc gcc make libc6-dev)
# runc and mmdebstrap: the Kubernetes tests run a real container (tests/test_kube_runc.py)
[ "$mode" = --test ] && packages+=(prometheus tmux procps runc mmdebstrap)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
updated=0
apt_install() {
  [ $updated = 1 ] || { apt-get update -qq; updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then say "installing ${missing[*]}"; apt_install "${missing[@]}"; fi

# bcc compiles against the running kernel's headers. Where the distribution has none for this kernel
# (custom or cloud kernels), the generic headers serve: uprobes do not depend on the exact version.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build" ]; then
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1 || { [ $updated = 0 ] && apt-get update -qq && updated=1 &&
       apt-cache show "linux-headers-$release" >/dev/null 2>&1; }; then
    say "installing linux-headers-$release"; apt_install "linux-headers-$release"
  else
    generic=linux-headers-$(dpkg --print-architecture)
    say "no headers packaged for $release: linking the generic $generic"
    dpkg -s "$generic" >/dev/null 2>&1 || apt_install "$generic"
    hdr=$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" | sort -V | tail -1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1)
    mkdir -p "/lib/modules/$release"
    ln -sfn "$hdr" "/lib/modules/$release/build"
    ln -sfn "$common" "/lib/modules/$release/source"
  fi
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing

# bcc's Python module is the distribution's, so the environment is built on the system python3.
if [ ! -x "$VENV/bin/python" ]; then say "creating $VENV"; /usr/bin/python3 -m venv --system-site-packages "$VENV"; fi
if [ "$mode" = --test ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
else
  "$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps . &&
  "$VENV/bin/pip" install -q --disable-pip-version-check .
fi
ln -sfn "$VENV/bin/gpuwatch" /usr/local/bin/gpuwatch

# The interposer that `gpuwatch exec` preloads. `install` replaces the file (new inode), so programs that
# have the old one loaded keep running.
say "building the interposer"
make -s -C interposer
install -D -m 0755 interposer/libgpuwatch.so "$PREFIX/lib/libgpuwatch.so"
"$VENV/bin/python" -c 'import bcc, gpuwatch.probes' || { echo "install.sh: gpuwatch cannot import bcc" >&2; exit 1; }
say "gpuwatch installed: $(command -v gpuwatch)"

if [ "$mode" = --test ]; then
  lint
  exec "$VENV/bin/python" -m pytest -ra -p no:cacheprovider tests
fi
