// CUDA arrays and mipmapped arrays, part of fakecuda.c (included at its end).
//
// An array's memory is a device allocation of its own (an allocs[] entry: the checkpoint moves it like any),
// of the array's requirement: its descriptor's bytes (every level of a mipmapped array) rounded up to 2 MiB,
// so that the requirement and the descriptor differ as on the real driver (tiling, alignment). Arrays made
// with CUDA_ARRAY3D_DEFERRED_MAPPING or CUDA_ARRAY3D_SPARSE get no memory; only they answer
// cuArrayGetMemoryRequirements and cuMipmappedArrayGetMemoryRequirements (anything else: invalid value, as
// the real driver answers). Formats: the eight classic ones; channels 1, 2 or 4. cuMemcpyHtoA_v2 and
// cuMemcpyAtoH_v2 reach an array's bytes in row order.

typedef struct { size_t Width, Height; int Format; unsigned NumChannels; } CUDA_ARRAY_DESCRIPTOR;
typedef struct { size_t Width, Height, Depth; int Format; unsigned NumChannels, Flags; } CUDA_ARRAY3D_DESCRIPTOR;
typedef struct { size_t size, alignment; unsigned reserved[4]; } CUDA_ARRAY_MEMORY_REQUIREMENTS;
#define ARRAY_LAYERED 0x01
#define ARRAY_CUBEMAP 0x04
#define ARRAY_SPARSE 0x40
#define ARRAY_DEFERRED 0x80
#define MAX_LEVELS 32

struct CUarray_st {
	CUDA_ARRAY3D_DESCRIPTOR desc;
	unsigned levels;    // a mipmapped array's levels; 0: a plain array
	size_t bytes, need; // the descriptor's bytes, and the memory it takes (its requirement)
	CUdeviceptr buf;    // 0: deferred or sparse (no memory of its own)
	struct CUarray_st *next;
};
typedef struct CUarray_st *CUarray, *CUmipmappedArray;
static struct CUarray_st *arrays; // live ones: a stale handle is refused, not followed

static size_t format_bytes(int format)
{
	switch (format) {
	case 0x01: case 0x08: return 1;             // UNSIGNED_INT8, SIGNED_INT8
	case 0x02: case 0x09: case 0x10: return 2;  // UNSIGNED_INT16, SIGNED_INT16, HALF
	case 0x03: case 0x0a: case 0x20: return 4;  // UNSIGNED_INT32, SIGNED_INT32, FLOAT
	}
	return 0;
}

static size_t dim(size_t n, unsigned level) { return n >> level ? n >> level : 1; }

// The descriptor's bytes over `levels` levels (1 for a plain array); 0: invalid or too large.
static size_t descriptor_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
	size_t elem = format_bytes(d->Format) * d->NumChannels, total = 0, n;
	bool layers = d->Flags & (ARRAY_LAYERED | ARRAY_CUBEMAP); // depth counts layers (or faces): never halved
	if (!elem || !d->Width || (d->NumChannels != 1 && d->NumChannels != 2 && d->NumChannels != 4))
		return 0;
	for (unsigned l = 0; l < levels; l++) {
		size_t h = d->Height ? dim(d->Height, l) : 1, z = !d->Depth ? 1 : layers ? d->Depth : dim(d->Depth, l);
		if (__builtin_mul_overflow(dim(d->Width, l), h, &n) || __builtin_mul_overflow(n, z, &n) ||
		    __builtin_mul_overflow(n, elem, &n) || __builtin_add_overflow(total, n, &total))
			return 0;
	}
	return total;
}

static CUresult array_create(CUarray *out, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels, bool mipmapped)
{
	GATED;
	TRY(current(NULL));
	size_t bytes = out && d && levels && levels <= MAX_LEVELS ? descriptor_bytes(d, levels) : 0;
	if (!bytes || bytes > SIZE_MAX - GRAN)
		return E_VALUE;
	struct CUarray_st *a = calloc(1, sizeof *a);
	if (!a)
		return E_OOM;
	*a = (struct CUarray_st){*d, mipmapped ? levels : 0, bytes, (bytes + GRAN - 1) / GRAN * GRAN, 0, NULL};
	CUresult r = d->Flags & (ARRAY_SPARSE | ARRAY_DEFERRED) ? OK : mem_alloc(&a->buf, a->need, K_DEVICE);
	if (r) {
		free(a);
		return r;
	}
	pthread_mutex_lock(&lock);
	a->next = arrays;
	arrays = a;
	pthread_mutex_unlock(&lock);
	*out = a;
	return OK;
}

// Takes a live array of the kind asked (mipmapped or not) off the list. NULL: no such array.
static struct CUarray_st *array_take(CUarray handle, bool mipmapped)
{
	pthread_mutex_lock(&lock);
	struct CUarray_st **p = &arrays, *a;
	while ((a = *p) && (a != handle || !a->levels != !mipmapped))
		p = &a->next;
	if (a)
		*p = a->next;
	pthread_mutex_unlock(&lock);
	return a;
}

static struct CUarray_st *array_find(CUarray handle, bool mipmapped)
{
	pthread_mutex_lock(&lock);
	struct CUarray_st *a = arrays;
	while (a && (a != handle || !a->levels != !mipmapped))
		a = a->next;
	pthread_mutex_unlock(&lock);
	return a;
}

static CUresult array_destroy(CUarray handle, bool mipmapped)
{
	GATED;
	TRY(current(NULL));
	struct CUarray_st *a = array_take(handle, mipmapped);
	if (!a)
		return E_HANDLE;
	CUresult r = a->buf ? mem_free(a->buf, false) : OK;
	free(a);
	return r;
}

API CUresult cuArrayCreate_v2(CUarray *out, const CUDA_ARRAY_DESCRIPTOR *d)
{
	if (!d)
		return E_VALUE;
	CUDA_ARRAY3D_DESCRIPTOR d3 = {d->Width, d->Height, 0, d->Format, d->NumChannels, 0};
	return array_create(out, &d3, 1, false);
}

API CUresult cuArray3DCreate_v2(CUarray *out, const CUDA_ARRAY3D_DESCRIPTOR *d) { return array_create(out, d, 1, false); }

API CUresult cuMipmappedArrayCreate(CUmipmappedArray *out, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
	return array_create(out, d, levels, true);
}

API CUresult cuArrayDestroy(CUarray a) { return array_destroy(a, false); }
API CUresult cuMipmappedArrayDestroy(CUmipmappedArray a) { return array_destroy(a, true); }

static CUresult requirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req, CUarray handle, CUdevice dev, bool mipmapped)
{
	TRY(check_dev(dev));
	struct CUarray_st *a = array_find(handle, mipmapped);
	if (!req || !a || !(a->desc.Flags & ARRAY_DEFERRED))
		return E_VALUE;
	*req = (CUDA_ARRAY_MEMORY_REQUIREMENTS){.size = a->need, .alignment = GRAN};
	return OK;
}

API CUresult cuArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req, CUarray a, CUdevice dev)
{
	return requirements(req, a, dev, false);
}

API CUresult cuMipmappedArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req, CUmipmappedArray a,
						   CUdevice dev)
{
	return requirements(req, a, dev, true);
}

// The device address of [off, off+n) of a plain array with memory; 0: out of its bytes.
static CUdeviceptr array_span(CUarray handle, size_t off, size_t n)
{
	struct CUarray_st *a = array_find(handle, false);
	return a && a->buf && off <= a->bytes && n <= a->bytes - off ? a->buf + off : 0;
}

API CUresult cuMemcpyHtoA_v2(CUarray dst, size_t off, const void *src, size_t n)
{
	CUdeviceptr d = array_span(dst, off, n);
	return d ? copy(d, H(src), n) : E_VALUE;
}

API CUresult cuMemcpyAtoH_v2(void *dst, CUarray src, size_t off, size_t n)
{
	CUdeviceptr s = array_span(src, off, n);
	return s ? copy(H(dst), s, n) : E_VALUE;
}
