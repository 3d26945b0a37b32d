/*
 * lends.c - the memory a level-2 checked call lends to C, from the call to
 * the scan after it.
 *
 * While the call runs, the lent range is a PB_REGION_LENT region (regions.c),
 * so that checks and scans on other threads know C may hold it.  When the
 * call returns, the region goes and, unless a pin still covers the range,
 * the range is queued for the next retention scan (scan.c): C must not keep
 * a pointer into it now.  Each step used to be two or three calls from
 * Python; these are one each, on the hot path of every level-2 call.
 */
#include "pb_internal.h"
#include "pb_scan.h"
#include "ptrbridge.h"

uint64_t pb__lend_add(uintptr_t start, size_t size)
{
    uint64_t id = 0;
    /* Lent again: a pointer C still has into it from an earlier call is no
     * longer a retained pointer (the earlier scan target goes). */
    pb__scan_cancel(start, size);
    if (pb_region_add((const void *)start, size, PB_REGION_LENT, &id) != PB_OK)
        return 0;
    return id;
}

int pb__lend_return(uint64_t region, uintptr_t start, size_t size, uint64_t target_id)
{
    if (pb__region_remove_then_pinned(region, start))
        return 0; /* pinned: C may keep it */
    int status = pb__scan_retire(start, size, target_id);
    return status == PB_OK ? 1 : status;
}
