// The gated wrappers of every work-submission entry point (listed in hooks.def).
#include "interposer.h"

#define WRAPPER(name, counter, params, args, after_call)                             \
	API CUresult name params                                                     \
	{                                                                            \
		if (unlikely(!real_##name) && (!gw_ensure_driver(NULL) || !real_##name)) \
			return CUDA_ERROR_NOT_FOUND;                                 \
		uint32_t bits;                                                       \
		struct gw_slot *s_ = gw_gate_enter(&bits);                           \
		CUresult r_ = real_##name args;                                      \
		gw_count(s_, &s_->counter);                                          \
		after_call;                                                          \
		gw_gate_exit(s_);                                                    \
		return r_;                                                           \
	}
#define WORK(name, counter, params, args) WRAPPER(name, counter, params, args, (void)bits)
#define LAUNCH(name, counter, params, args, stream) \
	WRAPPER(name, counter, params, args, if (unlikely(bits & GATE_BOUNDED) && !r_) gw_bound_queue(stream))
#include "hooks.def"
