// Finds the real driver and hands out wrappers: exported names, dlsym, dlvsym and cuGetProcAddress.
#include "interposer.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdio.h>
#include <string.h>

#define REAL(name, params) HIDDEN CUresult (*real_##name) params;
#define HOOK(name, params) REAL(name, params)
#define WORK(name, counter, params, args) REAL(name, params)
#include "hooks.def"

#define HOOK(name, params) extern API CUresult name params;
#define WORK(name, counter, params, args) HOOK(name, params)
#include "hooks.def"

struct wrapper {
	const char *name;
	void **real;
	void *wrap; // NULL: resolved but not wrapped
};
static const struct wrapper wrappers[] = {
#define REAL(name, params) {#name, (void **)&real_##name, NULL},
#define HOOK(name, params) {#name, (void **)&real_##name, (void *)name},
#define WORK(name, counter, params, args) HOOK(name, params)
#include "hooks.def"
};
#define NWRAPPERS (sizeof wrappers / sizeof *wrappers)

HIDDEN atomic_bool gw_driver_ready;
static void *driver;
static pthread_mutex_t driver_lock = PTHREAD_MUTEX_INITIALIZER;

// ---- the real dlsym and dlvsym: found in the C library's symbol table, since the names are ours

typedef void *(*dlsym_fn)(void *, const char *);
typedef void *(*dlvsym_fn)(void *, const char *, const char *);
static _Atomic(void *) libc_dlsym;  // libc's dlsym and dlvsym, once looked up
static _Atomic(void *) libc_dlvsym;

struct elf_lookup {
	const char *name;
	void *found;
};

static uint32_t symbol_count(const ElfW(Addr) base, const ElfW(Dyn) *dyn)
{
	for (const ElfW(Dyn) *d = dyn; d->d_tag != DT_NULL; d++) {
		ElfW(Addr) p = d->d_un.d_ptr < base ? base + d->d_un.d_ptr : d->d_un.d_ptr;
		if (d->d_tag == DT_HASH)
			return ((const uint32_t *)p)[1];
		if (d->d_tag == DT_GNU_HASH) {
			const uint32_t *h = (const uint32_t *)p;
			uint32_t nbuckets = h[0], symoffset = h[1], bloom = h[2], max = 0;
			const uint32_t *buckets = (const uint32_t *)((const ElfW(Addr) *)(h + 4) + bloom);
			const uint32_t *chain = buckets + nbuckets;
			for (uint32_t i = 0; i < nbuckets; i++)
				max = buckets[i] > max ? buckets[i] : max;
			if (max < symoffset)
				return symoffset;
			while (!(chain[max - symoffset] & 1))
				max++;
			return max + 1;
		}
	}
	return 0;
}

static int find_in_object(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct elf_lookup *q = arg;
	const ElfW(Dyn) *dyn = NULL;
	(void)size;
	Dl_info self;
	if (dladdr((void *)find_in_object, &self) && self.dli_fbase == (void *)info->dlpi_addr)
		return 0; // our own dlsym
	for (int i = 0; i < info->dlpi_phnum; i++)
		if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
			dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
	if (!dyn || !info->dlpi_addr)
		return 0;
	const ElfW(Sym) *symtab = NULL;
	const char *strtab = NULL;
	for (const ElfW(Dyn) *d = dyn; d->d_tag != DT_NULL; d++) {
		ElfW(Addr) p = d->d_un.d_ptr < info->dlpi_addr ? info->dlpi_addr + d->d_un.d_ptr : d->d_un.d_ptr;
		if (d->d_tag == DT_SYMTAB)
			symtab = (const ElfW(Sym) *)p;
		else if (d->d_tag == DT_STRTAB)
			strtab = (const char *)p;
	}
	uint32_t n = symbol_count(info->dlpi_addr, dyn);
	for (uint32_t i = 0; symtab && strtab && i < n; i++)
		if (symtab[i].st_value && ELF64_ST_TYPE(symtab[i].st_info) == STT_FUNC &&
		    !strcmp(strtab + symtab[i].st_name, q->name)) {
			q->found = (void *)(info->dlpi_addr + symtab[i].st_value);
			return 1;
		}
	return 0;
}

static void *libc_function(const char *name)
{
	struct elf_lookup q = {name, NULL};
	dl_iterate_phdr(find_in_object, &q);
	return q.found;
}

// libc's own function `name`, looked up once and kept in `slot`
static void *libc_cached(_Atomic(void *) *slot, const char *name)
{
	void *f = atomic_load(slot);
	if (unlikely(!f)) {
		f = libc_function(name);
		atomic_store(slot, f);
	}
	return f;
}

static dlsym_fn real_dlsym(void) { return (dlsym_fn)libc_cached(&libc_dlsym, "dlsym"); }
static dlvsym_fn real_dlvsym(void) { return (dlvsym_fn)libc_cached(&libc_dlvsym, "dlvsym"); }

// ---- the driver

// Loads the driver once: the library that holds `hint` (a function the program found), else the configured one.
HIDDEN bool gw_ensure_driver(void *hint)
{
	if (likely(atomic_load_explicit(&gw_driver_ready, memory_order_acquire)))
		return true;
	pthread_mutex_lock(&driver_lock);
	if (!driver) {
		Dl_info info;
		if (hint && dladdr(hint, &info) && info.dli_fname)
			driver = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
		if (!driver)
			driver = dlopen(gw_cfg.real_libcuda, RTLD_NOW | RTLD_NOLOAD);
		if (!driver)
			driver = dlopen(gw_cfg.real_libcuda, RTLD_NOW);
		if (driver) {
			dlsym_fn lookup = real_dlsym();
			for (size_t i = 0; i < NWRAPPERS; i++)
				*wrappers[i].real = lookup(driver, wrappers[i].name);
			gw_control_start();
			atomic_store_explicit(&gw_driver_ready, true, memory_order_release);
		} else {
			static atomic_bool said;
			gw_warn_once(&said, "cannot load the CUDA driver %s: %s", gw_cfg.real_libcuda, dlerror());
		}
	}
	pthread_mutex_unlock(&driver_lock);
	return driver != NULL;
}

HIDDEN void *gw_wrap(void *fn)
{
	for (size_t i = 0; fn && i < NWRAPPERS; i++)
		if (*wrappers[i].real == fn && wrappers[i].wrap)
			return wrappers[i].wrap;
	return NULL;
}

static bool driver_function(void *fn)
{
	if (!fn)
		return false;
	if (!atomic_load(&gw_driver_ready)) {
		Dl_info info;
		const char *base;
		// Only a libcuda's functions make the driver load; anything else found by a cu* name passes through.
		if (!dladdr(fn, &info) || !info.dli_fname || !(base = strrchr(info.dli_fname, '/')) ||
		    strncmp(base + 1, "libcuda.so", 10))
			return false;
		gw_ensure_driver(fn);
	}
	return true;
}

// ---- lookups by name

static void *wrap_lookup(void *fn, const char *name)
{
	if (fn && name && name[0] == 'c' && name[1] == 'u' && driver_function(fn)) {
		void *w = gw_wrap(fn);
		if (w)
			return w;
	}
	return fn;
}

API void *dlsym(void *handle, const char *name)
{
	if (handle == RTLD_NEXT)
		return real_dlsym()(handle, name); // a tail call: glibc finds "next" from our caller's address
	return wrap_lookup(real_dlsym()(handle, name), name);
}

API void *dlvsym(void *handle, const char *name, const char *version)
{
	if (handle == RTLD_NEXT)
		return real_dlvsym()(handle, name, version);
	return wrap_lookup(real_dlvsym()(handle, name, version), name);
}

// A pointer the driver returned that is not one of its exports (seen on no driver so far): the variant is
// chosen by name and flags, as the driver would.
static void *wrap_by_name(const char *symbol, cuuint64_t flags)
{
	static const char *const ptsz[] = {"_v2_ptsz", "_ptsz", "_v2_ptds", "_ptds", "_v2", ""};
	static const char *const legacy[] = {"_v2", ""};
	const char *const *suffixes = flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM ? ptsz : legacy;
	size_t n = flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM ? 6 : 2;
	char name[128];
	for (size_t s = 0; s < n; s++) {
		snprintf(name, sizeof name, "%s%s", symbol, suffixes[s]);
		for (size_t i = 0; i < NWRAPPERS; i++)
			if (wrappers[i].wrap && *wrappers[i].real && !strcmp(wrappers[i].name, name))
				return wrappers[i].wrap;
	}
	return NULL;
}

static void wrap_proc_address(const char *symbol, void **pfn, cuuint64_t flags)
{
	void *w = gw_wrap(*pfn);
	Dl_info info;
	if (!w && dladdr(*pfn, &info) && info.dli_saddr == *pfn)
		return; // an export we do not wrap (an older version of a function, say)
	if (!w && (w = wrap_by_name(symbol, flags)))
		gw_log("cuGetProcAddress(%s) returned a function that is not an export; wrapped by name", symbol);
	if (w)
		*pfn = w;
}

API CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags)
{
	if (!gw_ensure_driver(NULL) || !real_cuGetProcAddress)
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult r = real_cuGetProcAddress(symbol, pfn, version, flags);
	if (r == CUDA_SUCCESS && pfn && *pfn && symbol)
		wrap_proc_address(symbol, pfn, flags);
	return r;
}

API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags, int *status)
{
	if (!gw_ensure_driver(NULL) || !real_cuGetProcAddress_v2)
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult r = real_cuGetProcAddress_v2(symbol, pfn, version, flags, status);
	if (r == CUDA_SUCCESS && pfn && *pfn && symbol)
		wrap_proc_address(symbol, pfn, flags);
	return r;
}
