/* A C library that keeps the pointer it is given and reads it on a later call: the classic
 * use after free when the caller's buffer is freed in between. */
#include <string.h>

static const char *kept;
static size_t kept_len;

void stale_keep(const char *p, size_t n)
{
    kept = p;
    kept_len = n;
}

/* Copies what the kept pointer points at now into out (n bytes). */
void stale_read(char *out, size_t n)
{
    memcpy(out, kept, n < kept_len ? n : kept_len);
}
