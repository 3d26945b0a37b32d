/* README: what a C library's delivery callback does with what Python gave it. */
#include <stdint.h>

void on_delivery(void *payload, uintptr_t userdata_token);

#include "ptrbridge.h"

void on_delivery(void *payload, uintptr_t userdata_token)
{
    pb_free(payload);                  /* a CBuffer that Python transferred */
    pb_handle_release(userdata_token); /* any thread, no GIL needed */
}
