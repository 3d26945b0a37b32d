"""A naive cffi program where C keeps a pointer to a Python buffer: setvbuf() keeps the buffer
as the stream's, and every later write lands in memory Python has freed.

    python -m ptrbridge run -- python stdio_buffer.py
"""
import cffi

ffi = cffi.FFI()
ffi.cdef("""
    typedef struct FILE FILE;
    FILE *fopen(const char *path, const char *mode);
    int setvbuf(FILE *stream, char *buf, int mode, size_t size);
    int fputs(const char *s, FILE *stream);
    int fclose(FILE *stream);
""")
libc = ffi.dlopen(None)


def open_buffered(path):
    f = libc.fopen(path, b"w")
    libc.setvbuf(f, ffi.from_buffer(bytearray(4096)), 0, 4096)   # BUG: stdio keeps the buffer
    return f


out = open_buffered(b"/dev/null")
libc.fputs(b"this line goes into the buffer stdio kept\n", out)
libc.fclose(out)
print("done")
