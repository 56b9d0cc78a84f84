/* Processes that export or import memory through legacy CUDA IPC: the driver's checkpoint cannot move them
 * safely (an importer checkpointed beside its exporter could not be restored, H200, driver 580), so user space
 * never checkpoints them (enforcer/checkpointer.py). */
#include "maps.h"
#include "calls.h"

static __always_inline int ipc_use(struct pt_regs *ctx)
{
    u32 tgid = gw_tgid(), one = 1;
    ipc_users.update(&tgid, &one);
    return 0;
}
