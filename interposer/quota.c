// The quota: device bytes charged per device on the shared page (`used`, split into swappable and not),
// refused past the quota the daemon set. Charging runs with the memory lock held.
#include "interposer.h"

HIDDEN __thread bool gw_quota_refused; // the last refusal was the quota's, not the device's

HIDDEN struct gw_device *gw_dev_stats(CUdevice dev)
{
	return &gw->dev[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1];
}

HIDDEN bool gw_charge(CUdevice dev, uint64_t bytes, bool swappable)
{
	gw_quota_refused = false;
	struct gw_device *d = gw_dev_stats(dev);
	uint64_t quota = atomic_load(&d->quota), used = atomic_load(&d->used);
	if (quota && (bytes > quota || used > quota - bytes)) {
		gw_release_empty_chunks(); // kept for speed, never at the price of a refusal
		used = atomic_load(&d->used);
	}
	if (quota && (bytes > quota || used > quota - bytes)) {
		atomic_fetch_add(&gw->quota_refusals, 1);
		gw_quota_refused = true;
		gw_log("refused %llu bytes on GPU %d: %llu of the quota of %llu in use", (unsigned long long)bytes, dev,
		       (unsigned long long)used, (unsigned long long)quota);
		return false;
	}
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
