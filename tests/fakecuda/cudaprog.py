#!/usr/bin/env python3
"""Python twin of cudaprog: the same line protocol on stdin/stdout, driving the CUDA
driver library through ctypes, with one persistent threading.Thread per worker name."""
import ctypes as C
import os
import queue
import re
import sys
import threading
import time

P, U64, SZ, VP, UINT, INT = C.POINTER, C.c_ulonglong, C.c_size_t, C.c_void_p, C.c_uint, C.c_int


class MemLocation(C.Structure):
    _fields_ = [("type", INT), ("id", INT)]


class AllocationProp(C.Structure):
    _fields_ = [("type", INT), ("requestedHandleTypes", INT), ("location", MemLocation),
                ("win32HandleMetaData", VP), ("allocFlags", C.c_ubyte * 8)]


class AccessDesc(C.Structure):
    _fields_ = [("location", MemLocation), ("flags", INT)]


class LaunchConfig(C.Structure):
    _fields_ = [(n, UINT) for n in ("gridDimX", "gridDimY", "gridDimZ", "blockDimX", "blockDimY",
                                    "blockDimZ", "sharedMemBytes")] + \
               [("hStream", VP), ("attrs", VP), ("numAttrs", UINT)]


LAUNCH = [VP] + [UINT] * 7 + [VP, VP, VP]
SIGNATURES = {
    "cuInit": [UINT],
    "cuDevicePrimaryCtxRetain": [P(VP), INT],
    "cuCtxCreate_v2": [P(VP), UINT, INT],
    "cuCtxSetCurrent": [VP],
    "cuCtxPushCurrent_v2": [VP],
    "cuCtxPopCurrent_v2": [P(VP)],
    "cuMemAlloc_v2": [P(U64), SZ],
    "cuMemAllocPitch_v2": [P(U64), P(SZ), SZ, SZ, UINT],
    "cuMemAllocManaged": [P(U64), SZ, UINT],
    "cuMemAllocAsync": [P(U64), SZ, VP],
    "cuMemAllocAsync_ptsz": [P(U64), SZ, VP],
    "cuMemAllocFromPoolAsync": [P(U64), SZ, VP, VP],
    "cuMemFree_v2": [U64],
    "cuMemFreeAsync": [U64, VP],
    "cuMemHostAlloc": [P(VP), SZ, UINT],
    "cuMemAllocHost_v2": [P(VP), SZ],
    "cuMemFreeHost": [VP],
    "cuMemGetInfo_v2": [P(SZ), P(SZ)],
    "cuMemCreate": [P(U64), SZ, P(AllocationProp), U64],
    "cuMemRelease": [U64],
    "cuMemAddressReserve": [P(U64), SZ, SZ, U64, U64],
    "cuMemAddressFree": [U64, SZ],
    "cuMemMap": [U64, SZ, SZ, U64, U64],
    "cuMemSetAccess": [U64, SZ, P(AccessDesc), SZ],
    "cuMemUnmap": [U64, SZ],
    "cuMemsetD8_v2": [U64, C.c_ubyte, SZ],
    "cuMemcpyHtoD_v2": [U64, VP, SZ],
    "cuMemcpyDtoH_v2": [VP, U64, SZ],
    "cuMemcpyDtoD_v2": [U64, U64, SZ],
    "cuMemcpy": [U64, U64, SZ],
    "cuLaunchKernel": LAUNCH,
    "cuLaunchKernel_ptsz": LAUNCH,
    "cuLaunchKernelEx": [P(LaunchConfig), VP, VP, VP],
    "cuLaunchCooperativeKernel": LAUNCH[:-1],
    "cuGraphLaunch": [VP, VP],
    "cuGetProcAddress_v2": [C.c_char_p, P(VP), INT, U64, P(INT)],
    "cuLaunchHostFunc": [VP, VP, VP],
}

MEM, HOST, HANDLE, RES, CTX = "mem", "host", "handle", "res", "ctx"
DUMMY = C.c_char()  # stands in for a CUfunction / CUgraphExec
DUMMY_P = C.cast(C.pointer(DUMMY), VP)
CHUNK = 1 << 20


class Fail(Exception):
    """Protocol or usage error: reply 'err -1 message'."""


class CudaError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class Obj:
    def __init__(self, kind, val, size=0, dev=0):
        self.kind, self.val, self.size, self.dev = kind, val, size, dev


cu = None  # the loaded library
objs = {}
workers = {}


def call(name, *args):
    r = getattr(cu, name)(*args)
    if r:
        raise CudaError(r)


NUMBER = re.compile(r"(0x[0-9a-fA-F]+|[0-9]+)([KMG]?)")


def number(s):
    """Decimal or 0x hex, with an optional K/M/G (powers of 1024) suffix."""
    m = NUMBER.fullmatch(s)
    if not m:
        raise Fail("bad number %s" % s)
    return int(m[1], 16 if m[1].startswith("0x") else 10) << 10 * " KMG".index(m[2] or " ")


def find(name, *kinds):
    o = objs.get(name)
    if o is None or o.kind not in kinds:
        raise Fail("no suitable object named %s" % name)
    return o


def c_load(path):
    global cu
    try:
        lib = C.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as e:
        raise Fail(str(e)) from None
    for name, argtypes in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise Fail("missing symbol " + name) from None
        fn.argtypes, fn.restype = argtypes, INT
    cu = lib
    call("cuInit", 0)


def context(arg):
    if NUMBER.fullmatch(arg):
        c = VP()
        call("cuDevicePrimaryCtxRetain", C.byref(c), number(arg))
        return c
    return VP(find(arg, CTX).val)


def c_ctx(dev):
    c = VP()
    call("cuDevicePrimaryCtxRetain", C.byref(c), number(dev))
    call("cuCtxSetCurrent", c)


def c_ctxcreate(name, dev):
    c = VP()
    call("cuCtxCreate_v2", C.byref(c), 0, number(dev))
    objs[name] = Obj(CTX, c.value, 0, number(dev))


def allocator(fn, *extra):
    def handler(name, size):
        p, n = U64(), number(size)
        call(fn, C.byref(p), n, *extra)
        objs[name] = Obj(MEM, p.value, n)
    return handler


def host_allocator(fn, *extra):
    def handler(name, size):
        p, n = VP(), number(size)
        call(fn, C.byref(p), n, *extra)
        objs[name] = Obj(HOST, p.value, n)
    return handler


def c_pitch(name, width, height, elem):
    p, pitch = U64(), SZ()
    call("cuMemAllocPitch_v2", C.byref(p), C.byref(pitch), number(width), number(height), number(elem))
    objs[name] = Obj(MEM, p.value, pitch.value * number(height))
    return pitch.value


def c_create(name, size, dev):
    prop = AllocationProp(type=1, location=MemLocation(1, number(dev)))  # pinned, on a device
    h = U64()
    call("cuMemCreate", C.byref(h), number(size), C.byref(prop), 0)
    objs[name] = Obj(HANDLE, h.value, number(size), number(dev))


def c_reserve(name, size):
    p = U64()
    call("cuMemAddressReserve", C.byref(p), number(size), 0, 0, 0)
    objs[name] = Obj(RES, p.value, number(size))


def c_map(res, offset, size, handle):
    r, h = find(res, RES), find(handle, HANDLE)
    va, n = r.val + number(offset), number(size)
    call("cuMemMap", va, n, 0, h.val, 0)
    desc = AccessDesc(MemLocation(1, h.dev), 3)  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    call("cuMemSetAccess", va, n, C.byref(desc), 1)


def c_addrfree(res):
    r = find(res, RES)
    call("cuMemAddressFree", r.val, r.size)


def c_write(name, byte):
    o = find(name, MEM, HOST, RES)
    call("cuMemsetD8_v2", o.val, number(byte), o.size)


def c_read(name):
    o = find(name, MEM, HOST, RES)
    buf = (C.c_ubyte * min(CHUNK, o.size))()
    h = 0xcbf29ce484222325  # FNV-1a 64
    for off in range(0, o.size, CHUNK):
        n = min(CHUNK, o.size - off)
        call("cuMemcpyDtoH_v2", buf, o.val + off, n)
        for b in bytes(buf)[:n]:
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def launcher(fn, *args):
    def handler(count):
        for _ in range(number(count)):
            call(fn, *args)
    return handler


def c_copy(direction, size):
    n = number(size)
    # Host buffers stand in for device memory: the copy is the only driver call.
    src, dst = C.create_string_buffer(n + 1), C.create_string_buffer(n + 1)
    s, d = C.addressof(src), C.addressof(dst)
    args = {"h2d": ("cuMemcpyHtoD_v2", d, s), "d2h": ("cuMemcpyDtoH_v2", d, s),
            "d2d": ("cuMemcpyDtoD_v2", d, s), "any": ("cuMemcpy", d, s)}.get(direction)
    if not args:
        raise Fail("copy direction must be h2d, d2h, d2d or any")
    call(*args, n)


def c_info():
    free, total = SZ(), SZ()
    call("cuMemGetInfo_v2", C.byref(free), C.byref(total))
    return "%d %d" % (free.value, total.value)


def c_proc(name):
    fn, status = VP(), INT()
    call("cuGetProcAddress_v2", name.encode(), C.byref(fn), 13000, 0, C.byref(status))
    return 1


@C.CFUNCTYPE(None, VP)
def sleep_ms(arg):
    time.sleep(C.cast(arg, P(U64))[0] / 1000)


def c_busy(ms):
    """A call that keeps the driver busy MS milliseconds (a host function that sleeps)."""
    arg = U64(number(ms))
    call("cuLaunchHostFunc", None, sleep_ms, C.byref(arg))


def c_exit(code):
    status = number(code)
    print("ok", flush=True)
    os._exit(status)


CONFIG = LaunchConfig(1, 1, 1, 1, 1, 1, 0, None, None, 0)
GRID = (1, 1, 1, 1, 1, 1, 0, None)
# name -> (handler, argument count, needs the library)
COMMANDS = {
    "load": (c_load, 1, False),
    "ctx": (c_ctx, 1, True),
    "ctxcreate": (c_ctxcreate, 2, True),
    "push": (lambda c: call("cuCtxPushCurrent_v2", context(c)), 1, True),
    "pop": (lambda: call("cuCtxPopCurrent_v2", C.byref(VP())), 0, True),
    "setcur": (lambda c: call("cuCtxSetCurrent", context(c)), 1, True),
    "alloc": (allocator("cuMemAlloc_v2"), 2, True),
    "pitch": (c_pitch, 4, True),
    "managed": (allocator("cuMemAllocManaged", 1), 2, True),  # CU_MEM_ATTACH_GLOBAL
    "async": (allocator("cuMemAllocAsync", None), 2, True),
    "asyncptsz": (allocator("cuMemAllocAsync_ptsz", None), 2, True),
    "pool": (allocator("cuMemAllocFromPoolAsync", None, None), 2, True),
    "free": (lambda n: call("cuMemFree_v2", find(n, MEM, HOST).val), 1, True),
    "freeasync": (lambda n: call("cuMemFreeAsync", find(n, MEM, HOST).val, None), 1, True),
    "hostalloc": (host_allocator("cuMemHostAlloc", 0), 2, True),
    "allochost": (host_allocator("cuMemAllocHost_v2"), 2, True),
    "freehost": (lambda n: call("cuMemFreeHost", find(n, MEM, HOST).val), 1, True),
    "create": (c_create, 3, True),
    "release": (lambda n: call("cuMemRelease", find(n, HANDLE).val), 1, True),
    "reserve": (c_reserve, 2, True),
    "map": (c_map, 4, True),
    "unmap": (lambda r, off, n: call("cuMemUnmap", find(r, RES).val + number(off), number(n)), 3, True),
    "addrfree": (c_addrfree, 1, True),
    "write": (c_write, 2, True),
    "read": (c_read, 1, True),
    "launch": (launcher("cuLaunchKernel", DUMMY_P, *GRID, None, None), 1, True),
    "launchptsz": (launcher("cuLaunchKernel_ptsz", DUMMY_P, *GRID, None, None), 1, True),
    "launchex": (launcher("cuLaunchKernelEx", C.byref(CONFIG), DUMMY_P, None, None), 1, True),
    "coop": (launcher("cuLaunchCooperativeKernel", DUMMY_P, *GRID, None), 1, True),
    "graph": (launcher("cuGraphLaunch", DUMMY_P, None), 1, True),
    "copy": (c_copy, 2, True),
    "info": (c_info, 0, True),
    "proc": (c_proc, 1, True),
    "pid": (os.getpid, 0, False),
    "sleep": (lambda ms: time.sleep(number(ms) / 1000), 1, False),
    "exit": (c_exit, 1, False),
    "busy": (c_busy, 1, True),
}


class Worker(threading.Thread):
    def __init__(self, name):
        super().__init__(name=name, daemon=True)
        self.requests, self.replies = queue.Queue(), queue.Queue()
        self.start()

    def run(self):
        # PR_SET_NAME: make the worker's name the OS thread name (comm), as pthread_setname_np does
        C.CDLL(None).prctl(15, self.name.encode()[:15], 0, 0, 0)
        while True:
            self.replies.put(execute(self.requests.get()))

    def submit(self, line):
        if threading.current_thread() is self:
            return execute(line)
        self.requests.put(line)
        return self.replies.get()


def execute(line):
    words = line.split()
    try:
        if words[0] == "thread":
            if len(words) < 3:
                raise Fail("usage: thread NAME COMMAND...")
            if words[1] not in workers:
                workers[words[1]] = Worker(words[1])
            return workers[words[1]].submit(" ".join(words[2:]))
        if words[0] not in COMMANDS:
            raise Fail("unknown command %s" % words[0])
        fn, argc, needs_lib = COMMANDS[words[0]]
        if len(words) != argc + 1:
            raise Fail("%s takes %d arguments" % (words[0], argc))
        if needs_lib and cu is None:
            raise Fail("no driver loaded")
        value = fn(*words[1:])
        return "ok" if value is None else "ok %s" % value
    except CudaError as e:
        return "err %d" % e.code
    except Fail as e:
        return "err -1 %s" % e
    except Exception as e:  # e.g. a ctypes conversion error: report it, keep the session alive
        return "err -1 %s: %s" % (type(e).__name__, e)


def main():
    for line in iter(sys.stdin.readline, ""):
        if line.strip() and not line.lstrip().startswith("#"):
            print(execute(line), flush=True)


if __name__ == "__main__":
    main()
