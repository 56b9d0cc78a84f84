// cudaprog's commands for CUDA arrays, graph memory, stream capture and IPC (included by cudaprog.c).
//
//   array NAME W H FMT CH              cuArrayCreate_v2 (FMT: the CUarray_format number, 0x20 float)
//   array3d NAME W H D FMT CH FLAGS    cuArray3DCreate_v2
//   mipmap NAME W H D FMT CH LEVELS    cuMipmappedArrayCreate
//   destroy NAME                       an array, mipmapped array, graph or exec
//   stream S                           cuStreamCreate
//   salloc NAME SIZE S / sfree NAME S  cuMemAllocAsync / cuMemFreeAsync on stream S
//   capture S / endcapture S G         cuStreamBeginCapture_v2 (global mode) / cuStreamEndCapture into graph G
//   graphcreate G                      cuGraphCreate
//   galloc G NAME SIZE DEV / gfree G NAME   a memory alloc node (its address is NAME) / a free node
//   instantiate E G / glaunch E COUNT  cuGraphInstantiateWithFlags / cuGraphLaunch
//   trim DEV / graphmem DEV            cuDeviceGraphMemTrim / "ok USED USED-HIGH RESERVED RESERVED-HIGH"
//   ipcget NAME                        cuIpcGetMemHandle: "ok HEX" (the 64 bytes)
//   ipcopen NAME HEX SIZE              cuIpcOpenMemHandle_v2 (lazy peer access); NAME is SIZE bytes from there
//   ipcclose NAME                      cuIpcCloseMemHandle
//   ipcevent E / ipcopenevent E HEX    an interprocess event and its handle / opened, recorded on and waited for

static size_t array_bytes(u64 w, u64 h, u64 d, u64 format, u64 channels)
{
	size_t elem = format == 1 || format == 8 ? 1 : format == 2 || format == 9 || format == 16 ? 2 : 4;
	return w * (h ? h : 1) * (d ? d : 1) * elem * channels;
}

static int c_array(char **a, u64 *n, char *v)
{
	CUDA_ARRAY_DESCRIPTOR d = {n[2], n[3], (int)n[4], (unsigned)n[5]};
	void *h;
	int r = cuArrayCreate_v2(&h, &d);
	return r ? r : define(a[1], ARR, (uintptr_t)h, array_bytes(n[2], n[3], 0, n[4], n[5]), 0);
}

static int c_array3d(char **a, u64 *n, char *v)
{
	CUDA_ARRAY3D_DESCRIPTOR d = {n[2], n[3], n[4], (int)n[5], (unsigned)n[6], (unsigned)n[7]};
	void *h;
	int r = cuArray3DCreate_v2(&h, &d);
	return r ? r : define(a[1], ARR, (uintptr_t)h, array_bytes(n[2], n[3], n[4], n[5], n[6]), 0);
}

static int c_mipmap(char **a, u64 *n, char *v)
{
	CUDA_ARRAY3D_DESCRIPTOR d = {n[2], n[3], n[4], (int)n[5], (unsigned)n[6], 0};
	void *h;
	int r = cuMipmappedArrayCreate(&h, &d, (unsigned)n[7]);
	return r ? r : define(a[1], MIP, (uintptr_t)h, 0, 0);
}

static int c_destroy(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], ARR | MIP | GRAPH | EXEC);
	void *h = (void *)(uintptr_t)o->val;
	int r = o->kind == ARR ? cuArrayDestroy(h) : o->kind == MIP ? cuMipmappedArrayDestroy(h)
		: o->kind == GRAPH ? cuGraphDestroy(h) : cuGraphExecDestroy(h);
	if (!r)
		o->kind = 0; // gone
	return r;
}

static int c_stream(char **a, u64 *n, char *v)
{
	void *s;
	int r = cuStreamCreate(&s, 1 /* CU_STREAM_NON_BLOCKING */);
	return r ? r : define(a[1], STREAM, (uintptr_t)s, 0, 0);
}

static int c_salloc(char **a, u64 *n, char *v)
{
	OBJ(s, a[3], STREAM);
	CUdeviceptr p;
	int r = cuMemAllocAsync(&p, n[2], (void *)(uintptr_t)s->val);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_sfree(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM);
	OBJ(s, a[2], STREAM);
	return cuMemFreeAsync(o->val, (void *)(uintptr_t)s->val);
}

static int c_capture(char **a, u64 *n, char *v)
{
	OBJ(s, a[1], STREAM);
	return cuStreamBeginCapture_v2((void *)(uintptr_t)s->val, 0 /* CU_STREAM_CAPTURE_MODE_GLOBAL */);
}

static int c_endcapture(char **a, u64 *n, char *v)
{
	OBJ(s, a[1], STREAM);
	void *g;
	int r = cuStreamEndCapture((void *)(uintptr_t)s->val, &g);
	return r ? r : define(a[2], GRAPH, (uintptr_t)g, 0, 0);
}

static int c_graphcreate(char **a, u64 *n, char *v)
{
	void *g;
	int r = cuGraphCreate(&g, 0);
	return r ? r : define(a[1], GRAPH, (uintptr_t)g, 0, 0);
}

static int c_galloc(char **a, u64 *n, char *v)
{
	OBJ(g, a[1], GRAPH);
	CUmemAccessDesc access = {{1, (int)n[4]}, 3};
	CUDA_MEM_ALLOC_NODE_PARAMS p = {.poolProps = {.allocType = 1, .location = {1, (int)n[4]}},
					.accessDescs = &access, .accessDescCount = 1, .bytesize = n[3]};
	void *node;
	int r = cuGraphAddMemAllocNode(&node, (void *)(uintptr_t)g->val, NULL, 0, &p);
	return r ? r : define(a[2], MEM, p.dptr, n[3], (int)n[4]);
}

static int c_gfree(char **a, u64 *n, char *v)
{
	OBJ(g, a[1], GRAPH);
	OBJ(o, a[2], MEM);
	void *node;
	return cuGraphAddMemFreeNode(&node, (void *)(uintptr_t)g->val, NULL, 0, o->val);
}

static int c_instantiate(char **a, u64 *n, char *v)
{
	OBJ(g, a[2], GRAPH);
	void *e;
	int r = cuGraphInstantiateWithFlags(&e, (void *)(uintptr_t)g->val, 0);
	return r ? r : define(a[1], EXEC, (uintptr_t)e, 0, 0);
}

static int c_glaunch(char **a, u64 *n, char *v)
{
	OBJ(e, a[1], EXEC);
	int r = 0;
	for (u64 i = 0; !r && i < n[2]; i++)
		r = cuGraphLaunch((void *)(uintptr_t)e->val, NULL);
	return r;
}

static int c_trim(char **a, u64 *n, char *v) { return cuDeviceGraphMemTrim((int)n[1]); }

static int c_graphmem(char **a, u64 *n, char *v)
{
	u64 value[4];
	int r = 0;
	for (int attr = 0; !r && attr < 4; attr++)
		r = cuDeviceGetGraphMemAttribute((int)n[1], attr, &value[attr]);
	if (!r)
		snprintf(v, VALUE_MAX, "%llu %llu %llu %llu", value[0], value[1], value[2], value[3]);
	return r;
}

// ---- IPC: handles travel as 128 hex digits

static void to_hex(const CUipcHandle *h, char *v)
{
	for (int i = 0; i < 64; i++)
		snprintf(v + 2 * i, 3, "%02x", h->bytes[i]);
}

static bool from_hex(const char *s, CUipcHandle *h)
{
	if (strlen(s) != 128)
		return false;
	for (int i = 0; i < 64; i++) {
		unsigned x;
		if (!isxdigit((unsigned char)s[2 * i]) || !isxdigit((unsigned char)s[2 * i + 1]) ||
		    sscanf(s + 2 * i, "%2x", &x) != 1)
			return false;
		h->bytes[i] = (unsigned char)x;
	}
	return true;
}

static int c_ipcget(char **a, u64 *n, char *v)
{
	CUipcHandle h;
	OBJ(o, a[1], MEM | HOST | RES);
	int r = cuIpcGetMemHandle(&h, o->val);
	if (!r)
		to_hex(&h, v);
	return r;
}

static int c_ipcopen(char **a, u64 *n, char *v)
{
	CUipcHandle h;
	CUdeviceptr p;
	if (!from_hex(a[2], &h))
		return fail(v, "a handle is 128 hex digits");
	int r = cuIpcOpenMemHandle_v2(&p, h, 1 /* CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS */);
	return r ? r : define(a[1], MEM, p, n[3], 0);
}

static int c_ipcclose(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM);
	int r = cuIpcCloseMemHandle(o->val);
	if (!r)
		o->kind = 0;
	return r;
}

static int c_ipcevent(char **a, u64 *n, char *v)
{
	void *e;
	CUipcHandle h;
	int r = cuEventCreate(&e, 2 | 4 /* CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS */);
	if (!r && !(r = cuIpcGetEventHandle(&h, e)))
		to_hex(&h, v);
	return r ? r : define(a[1], EVENT, (uintptr_t)e, 0, 0);
}

static int c_ipcopenevent(char **a, u64 *n, char *v)
{
	CUipcHandle h;
	void *e;
	if (!from_hex(a[2], &h))
		return fail(v, "a handle is 128 hex digits");
	int r = cuIpcOpenEventHandle(&e, h);
	if (!r && !(r = cuEventRecord(e, NULL)) && !(r = cuStreamWaitEvent(NULL, e, 0)))
		r = cuEventSynchronize(e);
	return r ? r : define(a[1], EVENT, (uintptr_t)e, 0, 0);
}

#define MORE_COMMANDS                                                                                    \
	{"array", "wnnnn", c_array, true},       {"array3d", "wnnnnnn", c_array3d, true},                 \
	{"mipmap", "wnnnnnn", c_mipmap, true},   {"destroy", "w", c_destroy, true},                       \
	{"stream", "w", c_stream, true},         {"salloc", "wnw", c_salloc, true},                       \
	{"sfree", "ww", c_sfree, true},          {"capture", "w", c_capture, true},                       \
	{"endcapture", "ww", c_endcapture, true}, {"graphcreate", "w", c_graphcreate, true},              \
	{"galloc", "wwnn", c_galloc, true},      {"gfree", "ww", c_gfree, true},                          \
	{"instantiate", "ww", c_instantiate, true}, {"glaunch", "wn", c_glaunch, true},                   \
	{"trim", "n", c_trim, true},             {"graphmem", "n", c_graphmem, true},                     \
	{"ipcget", "w", c_ipcget, true},         {"ipcopen", "wwn", c_ipcopen, true},                     \
	{"ipcclose", "w", c_ipcclose, true},     {"ipcevent", "w", c_ipcevent, true},                     \
	{"ipcopenevent", "ww", c_ipcopenevent, true},
