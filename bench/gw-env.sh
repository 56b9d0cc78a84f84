# Source from the repository root: runs gpuwatch from this checkout without installing it (the GPU test
# machine has no package registry). Provides the `gpuwatch` shell function.
# /tmp/gw-pkg/gpuwatch is a real directory (a namespace package, an old layout may have left a link there) with
# a link per subpackage folder, as pyproject.toml's [tool.setuptools.package-dir] maps them.
if [ -L /tmp/gw-pkg/gpuwatch ]; then rm -f /tmp/gw-pkg/gpuwatch; fi
mkdir -p /tmp/gw-pkg/gpuwatch
rm -f /tmp/gw-pkg/gpuwatch/__init__.py
for d in core probes interposer enforcer daemon exporters client kube; do ln -sfn "$PWD/$d" "/tmp/gw-pkg/gpuwatch/$d"; done
export PYTHONPATH=/tmp/gw-pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# -P (Python 3.11+): the current directory stays off sys.path, so nothing in it shadows the links above.
gpuwatch() { python3 -P -m gpuwatch.client.cli "$@"; }
