// Graph memory: memory alloc nodes (cuGraphAddMemAllocNode) and stream-ordered allocations captured into a
// graph take device memory from the driver's graph pool when a graph launches, and the pool keeps it between
// launches until cuDeviceGraphMemTrim. What is counted, as unswappable, is the driver's own figure, the pool's
// reserved memory (cuDeviceGetGraphMemAttribute), read again after each call that can change it: launches of
// graphs with memory nodes, exec destruction, trims. Held to the quota: a memory node or captured allocation
// larger than the quota is refused when it is made; a launch that could grow the pool past the quota is refused
// before it runs, with CUDA_ERROR_OUT_OF_MEMORY. Graph launches pass the gate here (they are not in work.c).
#include "interposer.h"

#include <stdlib.h>

struct exec { // an exec instantiated from a graph with memory nodes
	CUgraphExec exec;
	uint64_t bytes; // its alloc nodes' sizes
	CUdevice dev;
	struct exec *next;
};
static struct exec *execs;                // lock held for these two
static uint64_t counted[GW_MAX_DEVICES];  // the pool's reserved bytes when last read
static atomic_bool seen; // the process made graph memory: instantiations and launches are looked at

HIDDEN void gw_graphmem_reset(void) // in a forked child
{
	execs = NULL;
	for (int d = 0; d < GW_MAX_DEVICES; d++)
		counted[d] = 0;
	atomic_store(&seen, false);
}

static int slot(CUdevice dev) { return dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1; }

HIDDEN CUresult gw_graph_captured(CUdevice dev, size_t size)
{
	atomic_store(&seen, true);
	return gw_quota_room(dev, size, UINT64_MAX) ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static void reconcile(CUdevice dev)
{
	uint64_t reserved = 0;
	if (!real_cuDeviceGetGraphMemAttribute ||
	    real_cuDeviceGetGraphMemAttribute(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved))
		return;
	gw_memory_lock();
	uint64_t *c = &counted[slot(dev)];
	if (reserved > *c)
		gw_charge_anyway(dev, reserved - *c);
	else if (reserved < *c)
		gw_uncharge(dev, *c - reserved, false);
	*c = reserved;
	gw_memory_unlock();
}

API CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph g, const CUgraphNode *deps, size_t ndeps,
				    CUDA_MEM_ALLOC_NODE_PARAMS *p)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!real_cuGraphAddMemAllocNode)
		return CUDA_ERROR_NOT_FOUND;
	if (p && p->poolProps.location.type == CU_MEM_LOCATION_TYPE_DEVICE) {
		gw_memory_lock();
		CUresult e = gw_graph_captured(p->poolProps.location.id, p->bytesize);
		gw_memory_unlock();
		if (e)
			return e;
	}
	return real_cuGraphAddMemAllocNode(node, g, deps, ndeps, p);
}

// ---- execs

// The sizes of a graph's memory alloc nodes, and their device.
static uint64_t node_bytes(CUgraph g, CUdevice *dev)
{
	size_t n = 0;
	uint64_t total = 0;
	if (!real_cuGraphGetNodes || !real_cuGraphNodeGetType || !real_cuGraphMemAllocNodeGetParams ||
	    real_cuGraphGetNodes(g, NULL, &n) || !n)
		return 0;
	CUgraphNode *nodes = calloc(n, sizeof *nodes);
	if (nodes && !real_cuGraphGetNodes(g, nodes, &n))
		for (size_t i = 0; i < n; i++) {
			int type = 0;
			CUDA_MEM_ALLOC_NODE_PARAMS p;
			if (nodes[i] && !real_cuGraphNodeGetType(nodes[i], &type) && type == CU_GRAPH_NODE_TYPE_MEM_ALLOC &&
			    !real_cuGraphMemAllocNodeGetParams(nodes[i], &p)) {
				total += p.bytesize;
				*dev = p.poolProps.location.id;
			}
		}
	free(nodes);
	return total;
}

static CUresult instantiated(CUresult e, CUgraphExec *exec, CUgraph g)
{
	CUdevice dev = 0;
	uint64_t bytes = !e && exec && atomic_load(&seen) ? node_bytes(g, &dev) : 0;
	struct exec *x = bytes ? malloc(sizeof *x) : NULL;
	if (x) {
		gw_memory_lock();
		*x = (struct exec){*exec, bytes, dev, execs};
		execs = x;
		gw_memory_unlock();
	}
	return e;
}

#define INSTANTIATE(name, params, args)                                                          \
	API CUresult name params                                                                 \
	{                                                                                        \
		if (!gw_ensure_driver(NULL))                                                     \
			return CUDA_ERROR_NOT_INITIALIZED;                                       \
		return real_##name ? instantiated(real_##name args, exec, g) : CUDA_ERROR_NOT_FOUND; \
	}
INSTANTIATE(cuGraphInstantiateWithFlags, (CUgraphExec *exec, CUgraph g, cuuint64_t flags), (exec, g, flags))
INSTANTIATE(cuGraphInstantiate_v2, (CUgraphExec *exec, CUgraph g, CUgraphNode *error_node, char *log, size_t log_size),
	    (exec, g, error_node, log, log_size))
INSTANTIATE(cuGraphInstantiateWithParams, (CUgraphExec *exec, CUgraph g, void *params), (exec, g, params))
INSTANTIATE(cuGraphInstantiateWithParams_ptsz, (CUgraphExec *exec, CUgraph g, void *params), (exec, g, params))

static bool find(CUgraphExec exec, struct exec *out, bool take)
{
	gw_memory_lock();
	struct exec **p = &execs, *x;
	while ((x = *p) && x->exec != exec)
		p = &x->next;
	if (x) {
		*out = *x;
		if (take) {
			*p = x->next;
			free(x);
		}
	}
	gw_memory_unlock();
	return x != NULL;
}

API CUresult cuGraphExecDestroy(CUgraphExec exec)
{
	struct exec x;
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!real_cuGraphExecDestroy)
		return CUDA_ERROR_NOT_FOUND;
	bool had = atomic_load(&seen) && find(exec, &x, true);
	CUresult e = real_cuGraphExecDestroy(exec);
	if (had)
		reconcile(x.dev);
	return e;
}

API CUresult cuDeviceGraphMemTrim(CUdevice dev)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuDeviceGraphMemTrim ? real_cuDeviceGraphMemTrim(dev) : CUDA_ERROR_NOT_FOUND;
	if (!e && atomic_load(&seen))
		reconcile(dev);
	return e;
}

// ---- launches

// Whether launching x could grow the pool past the quota: by what its alloc nodes need beyond the pool's unused part.
static CUresult room_for(const struct exec *x)
{
	uint64_t used = 0, reserved = 0;
	if (real_cuDeviceGetGraphMemAttribute(x->dev, CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT, &used) ||
	    real_cuDeviceGetGraphMemAttribute(x->dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved))
		return CUDA_SUCCESS; // the driver cannot say: the launch goes on
	uint64_t spare = reserved > used ? reserved - used : 0;
	if (x->bytes <= spare)
		return CUDA_SUCCESS;
	gw_memory_lock();
	bool fits = gw_quota_room(x->dev, x->bytes - spare, 0);
	gw_memory_unlock();
	return fits ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult launch(CUresult (*const *real)(CUgraphExec, CUstream), CUgraphExec g, CUstream s)
{
	if (unlikely(!*real) && (!gw_ensure_driver(NULL) || !*real))
		return CUDA_ERROR_NOT_FOUND;
	uint32_t bits;
	struct gw_slot *slot_ = gw_gate_enter(&bits);
	struct exec x = {0};
	bool pool = atomic_load(&seen) && real_cuDeviceGetGraphMemAttribute && find(g, &x, false);
	CUresult r = pool ? room_for(&x) : CUDA_SUCCESS;
	if (!r)
		r = (*real)(g, s);
	gw_count(slot_, &slot_->graph_launches);
	if (unlikely(bits & GATE_BOUNDED) && !r)
		gw_bound_queue(s);
	gw_gate_exit(slot_);
	if (pool && !r)
		reconcile(x.dev);
	return r;
}

API CUresult cuGraphLaunch(CUgraphExec g, CUstream s) { return launch(&real_cuGraphLaunch, g, s); }
API CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) { return launch(&real_cuGraphLaunch_ptsz, g, s); }
