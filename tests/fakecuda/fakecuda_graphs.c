// Graphs with memory nodes, stream capture and the graph memory pool, part of fakecuda.c (included at its end).
//
// A graph holds memory alloc and free nodes (cuGraphAddMemAllocNode, cuGraphAddMemFreeNode, or
// cuMemAllocAsync/cuMemFreeAsync on a stream being captured). An alloc node's address is fixed when the node is
// made and stays mapped while the graph or an exec instantiated from it lives; it takes no device memory until
// a launch. A launch allocates each alloc node from the device's graph pool, which grows (taking capacity) by
// what its unused part cannot give; a free node gives the allocation back to the pool, which keeps it
// (reserved) until cuDeviceGraphMemTrim. An allocation no free node frees outlives the launch: cuMemFree or
// cuMemFreeAsync outside the graph frees it, and launching its exec again first is CUDA_ERROR_INVALID_VALUE.
// cuDeviceGetGraphMemAttribute reports the pool (used and reserved, current and high). Other kinds of nodes are
// not emulated (a captured launch runs at once, as uncaptured work does). The checkpoint leaves the pool alone.

typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphNode_st *CUgraphNode;
typedef struct {
	int allocType, handleTypes;
	CUmemLocation location;
	void *win32SecurityAttributes;
	size_t maxSize;
	unsigned short usage;
	unsigned char reserved[54];
} CUmemPoolProps;
typedef struct {
	CUmemPoolProps poolProps;
	const CUmemAccessDesc *accessDescs;
	size_t accessDescCount, bytesize;
	CUdeviceptr dptr;
} CUDA_MEM_ALLOC_NODE_PARAMS;
_Static_assert(sizeof(CUmemPoolProps) == 88 && sizeof(CUDA_MEM_ALLOC_NODE_PARAMS) == 120, "driver ABI");

enum { NODE_MEM_ALLOC = 10, NODE_MEM_FREE = 11 };
enum { USED_MEM_CURRENT, USED_MEM_HIGH, RESERVED_MEM_CURRENT, RESERVED_MEM_HIGH };

struct gmem { // a memory node's allocation
	CUdeviceptr va;
	size_t size;
	CUdevice dev;
	int refs;  // the graph that made it, and each exec instantiated from that graph
	bool live; // a launch allocated it, and nothing freed it since
	struct gmem *next;
};
struct CUgraphNode_st {
	int type;
	struct gmem *mem; // the allocation made (alloc node) or freed (free node)
	struct CUgraphNode_st *next;
};
struct CUgraph_st {
	struct CUgraphNode_st *nodes;
	size_t count;
	struct CUgraph_st *next;
};
struct CUgraphExec_st {
	struct gmem **allocs, **frees;
	size_t nallocs, nfrees;
	struct CUgraphExec_st *next;
};
static struct CUgraph_st *graphs; // live graphs and execs: a stale handle is refused, not followed
static struct CUgraphExec_st *execs;
static struct gmem *gmems;
static size_t pool[4][MAX_DEVICES]; // by attribute: used, used high, reserved, reserved high

static bool graph_valid(CUgraph g) // lock held
{
	for (struct CUgraph_st *p = graphs; p; p = p->next)
		if (p == g)
			return true;
	return false;
}

static bool node_valid(CUgraphNode n) // lock held
{
	for (struct CUgraph_st *g = graphs; g; g = g->next)
		for (struct CUgraphNode_st *p = g->nodes; p; p = p->next)
			if (p == n)
				return true;
	return false;
}

static struct CUgraph_st *graph_new(void) // lock held
{
	struct CUgraph_st *g = calloc(1, sizeof *g);
	if (g) {
		g->next = graphs;
		graphs = g;
	}
	return g;
}

static struct CUgraphNode_st *node_add(struct CUgraph_st *g, int type, struct gmem *m) // lock held
{
	struct CUgraphNode_st *n = malloc(sizeof *n);
	if (n) {
		*n = (struct CUgraphNode_st){type, m, g->nodes};
		g->nodes = n;
		g->count++;
	}
	return n;
}

static void pool_note(CUdevice dev) // lock held: the high-water marks
{
	if (pool[USED_MEM_CURRENT][dev] > pool[USED_MEM_HIGH][dev])
		pool[USED_MEM_HIGH][dev] = pool[USED_MEM_CURRENT][dev];
	if (pool[RESERVED_MEM_CURRENT][dev] > pool[RESERVED_MEM_HIGH][dev])
		pool[RESERVED_MEM_HIGH][dev] = pool[RESERVED_MEM_CURRENT][dev];
}

// A new alloc node's allocation in g: its address, no memory behind it yet. Lock held.
static struct CUgraphNode_st *alloc_node(struct CUgraph_st *g, size_t size, CUdevice dev)
{
	size_t span = (size + GRAN - 1) / GRAN * GRAN;
	struct gmem *m = span >= size ? malloc(sizeof *m) : NULL;
	void *va = m ? mmap(NULL, span, RW, ANON, -1, 0) : MAP_FAILED;
	struct CUgraphNode_st *n = va == MAP_FAILED ? NULL : node_add(g, NODE_MEM_ALLOC, m);
	if (!n) {
		if (va != MAP_FAILED)
			munmap(va, span);
		free(m);
		return NULL;
	}
	*m = (struct gmem){(uintptr_t)va, size, dev, 1, false, gmems};
	gmems = m;
	return n;
}

// A free node in g for the allocation of g's alloc node at dptr. Lock held.
static struct CUgraphNode_st *free_node(struct CUgraph_st *g, CUdeviceptr dptr)
{
	struct gmem *m = NULL;
	for (struct CUgraphNode_st *n = g->nodes; n; n = n->next)
		if (n->mem->va == dptr && n->type == NODE_MEM_FREE)
			return NULL; // freed twice
		else if (n->mem->va == dptr)
			m = n->mem;
	return m ? node_add(g, NODE_MEM_FREE, m) : NULL;
}

static void gmem_put(struct gmem *m) // lock held
{
	if (--m->refs)
		return;
	if (m->live)
		pool[USED_MEM_CURRENT][m->dev] -= m->size;
	for (struct gmem **p = &gmems; *p; p = &(*p)->next)
		if (*p == m) {
			*p = m->next;
			break;
		}
	munmap((void *)(uintptr_t)m->va, (m->size + GRAN - 1) / GRAN * GRAN);
	free(m);
}

// ---- capture

static struct CUgraph_st *capturing(CUstream s)
{
	return (uintptr_t)s > 4096 ? s->capture : NULL; // 0, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD never capture
}

static int capture_status(CUstream s) { return capturing(s) ? 1 /* ACTIVE */ : 0 /* NONE */; }

API CUresult cuStreamBeginCapture_v2(CUstream s, int mode)
{
	GATED;
	CUresult r = OK;
	TRY(current(NULL));
	if ((uintptr_t)s <= 4096 || mode < 0 || mode > 2)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	if (s->capture)
		r = E_ILLEGAL_STATE;
	else if (!(s->capture = graph_new()))
		r = E_OOM;
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuStreamEndCapture(CUstream s, CUgraph *graph)
{
	GATED;
	TRY(current(NULL));
	if (!graph)
		return E_VALUE;
	if (!capturing(s))
		return E_ILLEGAL_STATE;
	*graph = s->capture;
	s->capture = NULL;
	return OK;
}

static CUresult async_alloc(CUdeviceptr *dptr, size_t size, CUstream s)
{
	GATED;
	CUdevice dev;
	struct CUgraph_st *g = capturing(s);
	if (!g)
		return mem_alloc(dptr, size, K_DEVICE);
	TRY(current(&dev));
	if (!dptr || !size)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct CUgraphNode_st *n = alloc_node(g, size, dev);
	pthread_mutex_unlock(&lock);
	if (!n)
		return E_OOM;
	*dptr = n->mem->va;
	return OK;
}

static CUresult async_free(CUdeviceptr dptr, CUstream s)
{
	GATED;
	struct CUgraph_st *g = capturing(s);
	if (!g)
		return mem_free(dptr, false);
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	struct CUgraphNode_st *n = free_node(g, dptr);
	pthread_mutex_unlock(&lock);
	return n ? OK : E_VALUE;
}

static CUresult graph_free_outside(CUdeviceptr dptr)
{
	CUresult r = E_VALUE;
	pthread_mutex_lock(&lock);
	for (struct gmem *m = gmems; m; m = m->next)
		if (m->va == dptr && m->live) {
			m->live = false;
			pool[USED_MEM_CURRENT][m->dev] -= m->size;
			r = OK;
			break;
		}
	pthread_mutex_unlock(&lock);
	return r;
}

// ---- graphs and their nodes

API CUresult cuGraphCreate(CUgraph *graph, unsigned flags)
{
	if (!inited)
		return E_NOINIT;
	if (!graph || flags)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	*graph = graph_new();
	pthread_mutex_unlock(&lock);
	return *graph ? OK : E_OOM;
}

API CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph g, const CUgraphNode *deps, size_t ndeps,
				   CUDA_MEM_ALLOC_NODE_PARAMS *p)
{
	GATED;
	if (!inited)
		return E_NOINIT;
	if (!node || !p || !p->bytesize || p->poolProps.allocType != 1 || p->poolProps.location.type != 1 ||
	    check_dev(p->poolProps.location.id) || (ndeps && !deps))
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct CUgraphNode_st *n = graph_valid(g) ? alloc_node(g, p->bytesize, p->poolProps.location.id) : NULL;
	pthread_mutex_unlock(&lock);
	if (!n)
		return E_VALUE;
	p->dptr = n->mem->va;
	*node = n;
	return OK;
}

API CUresult cuGraphAddMemFreeNode(CUgraphNode *node, CUgraph g, const CUgraphNode *deps, size_t ndeps,
				  CUdeviceptr dptr)
{
	if (!inited)
		return E_NOINIT;
	if (!node || (ndeps && !deps))
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct CUgraphNode_st *n = graph_valid(g) ? free_node(g, dptr) : NULL;
	pthread_mutex_unlock(&lock);
	*node = n;
	return n ? OK : E_VALUE;
}

API CUresult cuGraphGetNodes(CUgraph g, CUgraphNode *nodes, size_t *num)
{
	CUresult r = OK;
	if (!num)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	if (!graph_valid(g)) {
		r = E_VALUE;
	} else if (nodes) {
		size_t i = 0;
		for (struct CUgraphNode_st *n = g->nodes; n && i < *num; n = n->next)
			nodes[i++] = n;
		for (size_t j = i; j < *num; j++)
			nodes[j] = NULL;
		*num = i;
	} else {
		*num = g->count;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuGraphNodeGetType(CUgraphNode node, int *type)
{
	pthread_mutex_lock(&lock);
	bool ok = type && node_valid(node);
	if (ok)
		*type = node->type;
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

API CUresult cuGraphMemAllocNodeGetParams(CUgraphNode node, CUDA_MEM_ALLOC_NODE_PARAMS *out)
{
	pthread_mutex_lock(&lock);
	bool ok = out && node_valid(node) && node->type == NODE_MEM_ALLOC;
	if (ok)
		*out = (CUDA_MEM_ALLOC_NODE_PARAMS){.poolProps = {.allocType = 1, .location = {1, node->mem->dev}},
						    .bytesize = node->mem->size, .dptr = node->mem->va};
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

API CUresult cuGraphDestroy(CUgraph g)
{
	if (!inited)
		return E_NOINIT;
	pthread_mutex_lock(&lock);
	struct CUgraph_st **p = &graphs;
	while (*p && *p != g)
		p = &(*p)->next;
	bool found = *p;
	if (found) {
		*p = g->next;
		for (struct CUgraphNode_st *n = g->nodes, *next; n; n = next) {
			next = n->next;
			if (n->type == NODE_MEM_ALLOC)
				gmem_put(n->mem);
			free(n);
		}
		free(g);
	}
	pthread_mutex_unlock(&lock);
	return found ? OK : E_VALUE;
}

// ---- execs, launches and the pool

static CUresult instantiate(CUgraphExec *out, CUgraph g)
{
	CUresult r = OK;
	if (!inited)
		return E_NOINIT;
	if (!out)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct CUgraphExec_st *e = graph_valid(g) ? calloc(1, sizeof *e) : NULL;
	if (e) {
		e->allocs = calloc(g->count + 1, sizeof *e->allocs);
		e->frees = calloc(g->count + 1, sizeof *e->frees);
	}
	if (!e || !e->allocs || !e->frees) {
		r = e ? E_OOM : E_VALUE;
		if (e) {
			free(e->allocs);
			free(e->frees);
		}
		free(e);
	} else {
		for (struct CUgraphNode_st *n = g->nodes; n; n = n->next)
			if (n->type == NODE_MEM_ALLOC)
				(e->allocs[e->nallocs++] = n->mem)->refs++;
			else
				e->frees[e->nfrees++] = n->mem; // the alloc node's reference keeps it
		e->next = execs;
		execs = e;
		*out = e;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuGraphInstantiateWithFlags(CUgraphExec *out, CUgraph g, unsigned long long flags)
{
	return instantiate(out, g);
}

API CUresult cuGraphExecDestroy(CUgraphExec e)
{
	if (!inited)
		return E_NOINIT;
	pthread_mutex_lock(&lock);
	struct CUgraphExec_st **p = &execs;
	while (*p && *p != e)
		p = &(*p)->next;
	bool found = *p;
	if (found) {
		*p = e->next;
		for (size_t i = 0; i < e->nallocs; i++)
			gmem_put(e->allocs[i]);
		free(e->allocs);
		free(e->frees);
		free(e);
	}
	pthread_mutex_unlock(&lock);
	return found ? OK : E_VALUE;
}

// Allocates the exec's alloc nodes from the pool, growing it where needed (all or nothing), then runs its free
// nodes. Lock held.
static CUresult pool_run(struct CUgraphExec_st *e)
{
	size_t need[MAX_DEVICES] = {0}, grew[MAX_DEVICES] = {0};
	for (size_t i = 0; i < e->nallocs; i++) {
		if (e->allocs[i]->live)
			return E_VALUE; // a previous launch's allocation that nothing freed
		need[e->allocs[i]->dev] += e->allocs[i]->size;
	}
	for (int d = 0; d < ndev; d++) {
		size_t spare = pool[RESERVED_MEM_CURRENT][d] - pool[USED_MEM_CURRENT][d];
		if (need[d] > spare && !take(d, need[d] - spare)) {
			while (d--)
				if (grew[d]) {
					give(d, grew[d]);
					pool[RESERVED_MEM_CURRENT][d] -= grew[d];
				}
			return E_OOM;
		}
		grew[d] = need[d] > spare ? need[d] - spare : 0;
		pool[RESERVED_MEM_CURRENT][d] += grew[d];
		pool[USED_MEM_CURRENT][d] += need[d];
		pool_note(d);
	}
	for (size_t i = 0; i < e->nallocs; i++)
		e->allocs[i]->live = true;
	for (size_t i = 0; i < e->nfrees; i++) {
		e->frees[i]->live = false;
		pool[USED_MEM_CURRENT][e->frees[i]->dev] -= e->frees[i]->size;
	}
	return OK;
}

static CUresult graph_launch(CUgraphExec exec)
{
	GATED;
	CUresult r = OK;
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	struct CUgraphExec_st *e = execs;
	while (e && e != exec)
		e = e->next;
	if (e) // anything else stands for a graph without memory nodes
		r = pool_run(e);
	pthread_mutex_unlock(&lock);
	return r ? r : launch();
}

API CUresult cuDeviceGraphMemTrim(CUdevice dev)
{
	TRY(check_dev(dev));
	pthread_mutex_lock(&lock);
	size_t spare = pool[RESERVED_MEM_CURRENT][dev] - pool[USED_MEM_CURRENT][dev];
	give(dev, spare);
	pool[RESERVED_MEM_CURRENT][dev] -= spare;
	pthread_mutex_unlock(&lock);
	return OK;
}

API CUresult cuDeviceGetGraphMemAttribute(CUdevice dev, int attr, void *value)
{
	TRY(check_dev(dev));
	if (!value || attr < USED_MEM_CURRENT || attr > RESERVED_MEM_HIGH)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	*(uint64_t *)value = pool[attr][dev];
	pthread_mutex_unlock(&lock);
	return OK;
}

API CUresult cuDeviceSetGraphMemAttribute(CUdevice dev, int attr, void *value)
{
	TRY(check_dev(dev));
	if (!value || *(uint64_t *)value || (attr != USED_MEM_HIGH && attr != RESERVED_MEM_HIGH))
		return E_VALUE; // only the high-water marks can be reset, and only to 0 (the current value)
	pthread_mutex_lock(&lock);
	pool[attr][dev] = pool[attr - 1][dev];
	pthread_mutex_unlock(&lock);
	return OK;
}
