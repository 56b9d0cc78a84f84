// The table of allocations made through the entry points, by start address: what each is, where it came
// from and what it charged. Every function here runs with the memory lock held.
#include "interposer.h"

#include <stdlib.h>

static struct gw_alloc **table;
static size_t table_size, table_count;

HIDDEN void gw_table_reset(void) // in a forked child: the parent's entries are not ours to free
{
	table = NULL;
	table_size = table_count = 0;
}

static size_t slot_of(CUdeviceptr p) { return (size_t)((p >> 8) * 0x9E3779B97F4A7C15ull >> 20) & (table_size - 1); }

static bool table_grow(void)
{
	size_t n = table_size ? table_size * 2 : 1024;
	struct gw_alloc **t = calloc(n, sizeof *t);
	if (!t)
		return false;
	struct gw_alloc **old = table;
	size_t old_size = table_size;
	table = t;
	table_size = n;
	for (size_t i = 0; i < old_size; i++)
		for (struct gw_alloc *a = old[i], *next; a; a = next) {
			next = a->next;
			a->next = table[slot_of(a->ptr)];
			table[slot_of(a->ptr)] = a;
		}
	free(old);
	return true;
}

HIDDEN struct gw_alloc *gw_table_add(CUdeviceptr ptr, size_t size, enum gw_alloc_kind kind, CUdevice dev,
				     CUcontext ctx)
{
	struct gw_alloc *a = malloc(sizeof *a);
	if (!a || (table_count >= table_size && !table_grow())) {
		free(a);
		return NULL;
	}
	*a = (struct gw_alloc){ptr, size, 0, NULL, ctx, dev, kind, table[slot_of(ptr)]};
	table[slot_of(ptr)] = a;
	table_count++;
	return a;
}

HIDDEN struct gw_alloc *gw_table_find(CUdeviceptr ptr)
{
	if (!table_size)
		return NULL;
	struct gw_alloc *a = table[slot_of(ptr)];
	while (a && a->ptr != ptr)
		a = a->next;
	return a;
}

HIDDEN void gw_table_remove(struct gw_alloc *a)
{
	struct gw_alloc **p = &table[slot_of(a->ptr)];
	while (*p != a)
		p = &(*p)->next;
	*p = a->next;
	table_count--;
	free(a);
}

HIDDEN void gw_table_each(void (*fn)(struct gw_alloc *a, void *arg), void *arg)
{
	for (size_t i = 0; i < table_size; i++)
		for (struct gw_alloc *a = table[i], *next; a; a = next) {
			next = a->next;
			fn(a, arg);
		}
}
