// The gated wrappers of every work-submission entry point (listed in hooks.def).
#include "interposer.h"

#define WORK(name, counter, params, args)                                       \
	API CUresult name params                                                \
	{                                                                       \
		if (unlikely(!real_##name) && (!gw_ensure_driver(NULL) || !real_##name)) \
			return CUDA_ERROR_NOT_FOUND;                            \
		uint32_t bits;                                                  \
		struct gw_slot *s_ = gw_gate_enter(&bits);                      \
		CUresult r_ = real_##name args;                                 \
		gw_count(s_, &s_->counter);                                     \
		gw_gate_exit(s_);                                               \
		return r_;                                                      \
	}
#define LAUNCH(name, counter, params, args, stream)                             \
	API CUresult name params                                                \
	{                                                                       \
		if (unlikely(!real_##name) && (!gw_ensure_driver(NULL) || !real_##name)) \
			return CUDA_ERROR_NOT_FOUND;                            \
		uint32_t bits;                                                  \
		struct gw_slot *s_ = gw_gate_enter(&bits);                      \
		CUresult r_ = real_##name args;                                 \
		gw_count(s_, &s_->counter);                                     \
		if (unlikely(bits & GATE_BOUNDED) && !r_)                       \
			gw_bound_queue(stream);                                 \
		gw_gate_exit(s_);                                               \
		return r_;                                                      \
	}
#include "hooks.def"
