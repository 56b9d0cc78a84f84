// The quota: device bytes charged per device on the shared page (`used`, split into swappable and not),
// refused past the quota the daemon set. Charging runs with the memory lock held.
#include "interposer.h"

HIDDEN __thread bool gw_quota_refused; // the last refusal was the quota's, not the device's

HIDDEN struct gw_device *gw_dev_stats(CUdevice dev)
{
	return &gw->dev[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1];
}

static bool fits(uint64_t quota, uint64_t used, uint64_t bytes)
{
	return !quota || (bytes <= quota && used <= quota - bytes);
}

static bool refuse(CUdevice dev, uint64_t bytes, uint64_t used, uint64_t quota)
{
	atomic_fetch_add(&gw->quota_refusals, 1);
	gw_quota_refused = true;
	gw_log("refused %llu bytes on GPU %d: %llu of the quota of %llu in use", (unsigned long long)bytes, dev,
	       (unsigned long long)used, (unsigned long long)quota);
	return false;
}

HIDDEN bool gw_charge(CUdevice dev, uint64_t bytes, bool swappable)
{
	gw_quota_refused = false;
	struct gw_device *d = gw_dev_stats(dev);
	uint64_t quota = atomic_load(&d->quota), used = atomic_load(&d->used);
	if (!fits(quota, used, bytes)) {
		gw_release_empty_chunks(); // kept for speed, never at the price of a refusal
		used = atomic_load(&d->used);
	}
	if (!fits(quota, used, bytes))
		return refuse(dev, bytes, used, quota);
	atomic_store(&d->used, used + bytes);
	atomic_fetch_add(swappable ? &d->swappable : &d->unswappable, bytes);
	return true;
}

HIDDEN void gw_uncharge(CUdevice dev, uint64_t bytes, bool swappable)
{
	struct gw_device *d = gw_dev_stats(dev);
	atomic_fetch_sub(&d->used, bytes);
	atomic_fetch_sub(swappable ? &d->swappable : &d->unswappable, bytes);
}

HIDDEN void gw_charge_anyway(CUdevice dev, uint64_t bytes)
{
	struct gw_device *d = gw_dev_stats(dev);
	atomic_fetch_add(&d->used, bytes);
	atomic_fetch_add(&d->unswappable, bytes);
}

HIDDEN bool gw_quota_room(CUdevice dev, uint64_t bytes, uint64_t reusable)
{
	gw_quota_refused = false;
	struct gw_device *d = gw_dev_stats(dev);
	uint64_t quota = atomic_load(&d->quota), used = atomic_load(&d->used);
	uint64_t others = used > reusable ? used - reusable : 0;
	if (!fits(quota, others, bytes)) {
		gw_release_empty_chunks();
		used = atomic_load(&d->used);
		others = used > reusable ? used - reusable : 0;
	}
	return fits(quota, others, bytes) || refuse(dev, bytes, used, quota);
}

HIDDEN void gw_recount(CUdevice dev, uint64_t bytes, bool to_swappable)
{
	struct gw_device *d = gw_dev_stats(dev);
	atomic_fetch_sub(to_swappable ? &d->unswappable : &d->swappable, bytes);
	atomic_fetch_add(to_swappable ? &d->swappable : &d->unswappable, bytes);
}
