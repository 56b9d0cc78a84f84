#!/usr/bin/env bash
# Smoke test of the fake CUDA driver: builds into a temp dir, checks the exported symbols and
# runs the same scripted sessions through cudaprog (C) and cudaprog.py (Python).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
IMPL=build

fail() { echo "FAIL [$IMPL]: $*" >&2; exit 1; }

log=$(make -C "$HERE" OUT="$TMP" 2>&1) || fail "$log"
! grep -qi warning <<<"$log" || fail "compiler warnings: $log"
LIB=$TMP/libcuda.so.1

# Every API is its own exported function (no aliases sharing an address).
IMPL=symbols
exports=$(nm -D --defined-only "$LIB" | awk '$2 == "T" && $3 ~ /^cu/ {print $1, $3}')
for f in cuInit cuDriverGetVersion cuDeviceGetCount cuDeviceGet cuDeviceGetName cuDeviceGetUuid \
	cuDeviceGetUuid_v2 cuDeviceTotalMem_v2 cuDeviceGetAttribute cuGetErrorName cuGetErrorString \
	cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease_v2 cuCtxCreate_v2 cuCtxDestroy_v2 \
	cuCtxSetCurrent cuCtxGetCurrent cuCtxPushCurrent_v2 cuCtxPopCurrent_v2 cuCtxGetDevice \
	cuCtxSynchronize cuMemAlloc_v2 cuMemAllocPitch_v2 cuMemAllocManaged cuMemAllocAsync \
	cuMemAllocAsync_ptsz cuMemAllocFromPoolAsync cuMemAllocFromPoolAsync_ptsz cuMemFree_v2 \
	cuMemFreeAsync cuMemFreeAsync_ptsz cuMemHostAlloc cuMemAllocHost_v2 cuMemFreeHost \
	cuMemGetInfo_v2 cuMemGetAllocationGranularity cuMemCreate cuMemRelease cuMemAddressReserve \
	cuMemAddressFree cuMemMap cuMemSetAccess cuMemUnmap cuMemcpyHtoD_v2 cuMemcpyDtoH_v2 \
	cuMemcpyDtoD_v2 cuMemcpyHtoDAsync_v2 cuMemcpyDtoHAsync_v2 cuMemcpyDtoDAsync_v2 \
	cuMemcpyHtoDAsync_v2_ptsz cuMemcpyDtoHAsync_v2_ptsz cuMemcpyDtoDAsync_v2_ptsz cuMemcpy \
	cuMemcpyAsync cuMemcpyAsync_ptsz cuMemsetD8_v2 cuMemsetD32_v2 cuStreamCreate \
	cuStreamDestroy_v2 cuStreamSynchronize cuLaunchKernel cuLaunchKernel_ptsz cuLaunchKernelEx \
	cuLaunchKernelEx_ptsz cuLaunchCooperativeKernel cuLaunchCooperativeKernel_ptsz cuGraphLaunch \
	cuGraphLaunch_ptsz cuModuleGetFunction cuGetProcAddress cuGetProcAddress_v2 cuLaunchHostFunc \
	cuCheckpointProcessGetState cuCheckpointProcessLock cuCheckpointProcessCheckpoint \
	cuCheckpointProcessRestore cuCheckpointProcessUnlock cuCheckpointProcessGetRestoreThreadId; do
	grep -q " $f\$" <<<"$exports" || fail "$f is not exported"
done
dups=$(awk '{print $1}' <<<"$exports" | sort | uniq -d)
[[ -z $dups ]] || fail "exports sharing an address: $dups"

M=$((1 << 20))
fnv() { # FNV-1a 64 of COUNT copies of BYTE, computed independently of cudaprog
	python3 -c 'import sys
h = 0xcbf29ce484222325
for b in bytes([int(sys.argv[1], 0)]) * int(sys.argv[2]):
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print("%016x" % h)' "$1" "$2"
}
H5A=$(fnv 0x5a $((4 * M)))
HC3=$(fnv 0xc3 $((4 * M)))
H07=$(fnv 7 $((4 * M)))

start() { # start the program "$@" with stdin/stdout on fds 3/4
	rm -f "$TMP/in" "$TMP/out"
	mkfifo "$TMP/in" "$TMP/out"
	"$@" <"$TMP/in" >"$TMP/out" &
	PID=$!
	exec 3>"$TMP/in" 4<"$TMP/out"
	STEPS=0
}

q() { # send command $1, expect a reply matching the regex ^$2$
	STEPS=$((STEPS + 1))
	printf '%s\n' "$1" >&3
	IFS= read -r -t 30 R <&4 || fail "no reply to '$1'"
	[[ $R =~ ^$2$ ]] || fail "'$1' replied '$R', expected '$2'"
}

finish() { # close stdin, expect exit status $1
	exec 3>&- 4<&-
	local rc=0
	wait "$PID" || rc=$?
	[[ $rc == "$1" ]] || fail "exit status $rc, expected $1"
	echo "ok [$IMPL] $STEPS commands, exit $rc"
}

info() { q info "ok $(($1)) $((64 * M))"; } # free bytes (an expression) on a 64 MiB device

session() {
	IMPL=$1
	shift
	FAKECUDA_MEM_BYTES=64M start "$@"
	q pid "ok $PID"
	q "alloc a 1M" "err -1 .+"
	q "load $TMP/nonexistent.so" "err -1 .+"
	q "load $LIB" ok
	q bogus "err -1 .+"
	q "alloc a" "err -1 .+"
	q "alloc a 1X" "err -1 .+"
	q "alloc a 1M" "err 201"
	q info "err 201"
	q "ctx 2" "err 101"
	q "ctx 0" ok
	info "64 * M"

	# ordinary allocations and per-device accounting
	q "alloc a 1M" ok
	q "alloc zero 0" "err 1"
	q "alloc big 64M" "err 2"
	info "63 * M"
	q "alloc rest 63M" ok
	q "alloc one 1" "err 2"
	q "free rest" ok
	q "free rest" "err 1"
	q "pitch p 1000 10 4" "ok 1024"
	info "63 * M - 10240"
	q "managed m 100M" ok
	q "hostalloc h 100M" ok
	q "allochost h2 1M" ok
	info "63 * M - 10240"
	q "async x 1M" ok
	q "asyncptsz y 1M" ok
	q "pool z 1M" ok
	info "60 * M - 10240"
	q "freeasync x" ok
	q "free y" ok
	q "freeasync z" ok
	q "write h2 0x5a" ok
	q "read h2" "ok [0-9a-f]{16}"
	q "free h2" "err 1"
	q "freehost a" "err 1"
	q "freehost h2" ok
	q "freehost h" ok
	q "free m" ok
	q "free p" ok
	info "63 * M"

	# copies, launches, proc addresses
	for d in h2d d2h d2d any; do q "copy $d 1M" ok; done
	q "copy sideways 1" "err -1 .+"
	q "launch 5" ok
	q "launchptsz 2" ok
	q "launchex 3" ok
	q "coop 1" ok
	q "graph 4" ok
	q "busy 5" ok
	q "proc cuMemAlloc" "ok 1"
	q "proc cuLaunchKernel" "ok 1"
	q "proc cuMemcpyHtoDAsync" "ok 1"
	q "proc cuNoSuchThing" "err 500"
	q "proc malloc" "err 500"

	# contexts: stack [p0] -> [p0 c1] -> [p0] -> [p0 c1 p0] -> [p0] -> [c1] -> [p0] -> []
	q "ctxcreate c1 1" ok
	info "64 * M"
	q "alloc d1 60M" ok
	info "4 * M"
	q pop ok
	info "63 * M"
	q "push c1" ok
	info "4 * M"
	q "push 0" ok
	info "63 * M"
	q pop ok
	q pop ok
	q "setcur c1" ok
	info "4 * M"
	q "free d1" ok
	q "ctx 0" ok
	q pop ok
	q pop "err 201"
	q "alloc t 1M" "err 201"
	q "ctx 0" ok

	# threads: contexts are per thread, frees may come from any thread
	q "thread w1 alloc t 1M" "err 201"
	q "thread w1 ctx 0" ok
	q "thread w1 alloc t 1M" ok
	info "62 * M"
	q "free t" ok
	q "thread w2 ctx 1" ok
	q "thread w2 free a" ok
	info "64 * M"
	q "thread w1 pid" "ok $PID"
	q "thread w1" "err -1 .+"
	for t in w1 w2; do grep -qx $t /proc/"$PID"/task/*/comm || fail "no thread named $t"; done

	# VMM: creation checks and accounting
	q "create bad 3M 0" "err 1"
	q "create bad 2M 9" "err 101"
	q "create huge 66M 0" "err 2"
	q "create h 4M 0" ok
	info "60 * M"
	q "reserve odd 3M" "err 1"
	q "reserve r1 4M" ok
	q "reserve r2 4M" ok
	q "map r1 0 4M h" ok
	q "map r2 0 4M h" ok
	q "map r1 2M 2M h" "err 1"
	# real aliasing: both reservations show the same memory
	q "alloc ref 4M" ok
	q "write ref 0x5a" ok
	q "read ref" "ok $H5A"
	q "write r1 0x5a" ok
	q "read r2" "ok $H5A"
	q "write r2 0xc3" ok
	q "read r1" "ok $HC3"
	# release before unmap: memory stays alive and counted until the last unmap
	q "release h" ok
	q "release h" "err 400"
	q "read r1" "ok $HC3"
	info "56 * M"
	q "unmap r1 0 4M" ok
	q "unmap r1 0 4M" "err 1"
	info "56 * M"
	q "read r2" "ok $HC3"
	q "unmap r2 0 4M" ok
	info "60 * M"
	q "map r1 0 4M h" "err 400"
	# unmap before release, one unmap covering two handles
	q "create g1 2M 0" ok
	q "create g2 2M 0" ok
	q "map r1 0 2M g1" ok
	q "map r1 2M 2M g2" ok
	q "write r1 7" ok
	q "read r1" "ok $H07"
	q "unmap r1 0 4M" ok
	info "56 * M"
	q "release g1" ok
	q "release g2" ok
	info "60 * M"
	# an unmap may not cut a mapping; freeing a reservation drops its mappings
	q "create g3 4M 1" ok
	q "map r1 0 4M g3" ok
	q "unmap r1 0 2M" "err 1"
	q "release g3" ok
	q "addrfree r1" ok
	q "addrfree r2" ok
	q "addrfree r1" "err 1"
	q "ctx 1" ok
	info "64 * M"
	q "ctx 0" ok

	# exit without freeing
	q "sleep 10" ok
	q "alloc leak 1M" ok
	q "thread w1 alloc leak2 1M" ok
	q "create leak3 2M 0" ok
	q "exit 3" ok
	finish 3

	# EOF exits 0; multi-GiB allocations cost nothing until touched (default 8 GiB per device)
	FAKECUDA_DEVICES=4 start "$@"
	q "load $LIB" ok
	q "ctx 3" ok
	q info "ok 8589934592 8589934592"
	q "alloc huge 6G" ok
	q "alloc more 3G" "err 2"
	q "create vm 2G 3" ok
	q info "ok 0 8589934592"
	q "ctx 4" "err 101"
	finish 0
}

session C "$TMP/cudaprog"
session Python python3 "$HERE/cudaprog.py"
echo "smoke test passed"
