# Source from the repository root: runs gpuwatch from this checkout without installing it (the GPU test
# machine has no package registry). Provides the `gpuwatch` shell function.
mkdir -p /tmp/gw-pkg/gpuwatch
for d in probes enforcer exporters interposer; do ln -sfn "$PWD/$d" "/tmp/gw-pkg/gpuwatch/$d"; done
export PYTHONPATH=/tmp/gw-pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
gpuwatch() { python3 -m gpuwatch.enforcer.cli "$@"; }
