/*
 * pybuffer.c - the C memory types of the Python side: BufferBase (base of
 * ptrbridge.CBuffer) and the batch helpers of CBuffer.copy_many.
 *
 * Python classes cannot export the buffer protocol before Python 3.12, and
 * cffi's buffer type cannot be subclassed, so ptrbridge.CBuffer derives from
 * this small type.  It exports [address, address + size) and counts the
 * exports, so that the memory is never given away (freed or transferred to
 * C) while a memoryview still points at it: transfer() and free() refuse with
 * BufferError, the way bytearray refuses to resize while exported.
 *
 * An owning BufferBase's block is allocated with pb__alloc_owned, so the
 * allocator knows Python owns it and refuses pb_free/ptrbridge.free of it.
 * Every owning instance is on a doubly-linked list (GIL-protected) with its
 * creation site, so leaks can be named (ptrbridge.stats.live_resources) and a
 * refused free can name the CBuffer that owns the block.  Once the memory is
 * transferred or freed, every use raises UseAfterTransferError saying which.
 *
 * pb__py_init() registers the types and functions of pybuffer.c,
 * pyhandles.c, pypin.c and pysite.c on ptrbridge._native.
 */
#include "pb_py.h"

#include <string.h>

#include "pb_internal.h"

enum { ST_VIEW = 0, ST_OWNED = 1, ST_TRANSFERRED = 2, ST_FREED = 3 };

typedef struct BufferBase {
    PyObject_HEAD
    char *ptr;
    Py_ssize_t size;      /* current exported size (0 once given up) */
    Py_ssize_t orig_size; /* size at creation, for messages */
    int readonly;
    int state;
    Py_ssize_t exports;
    PyObject *weakreflist;
    uint32_t site;
    struct BufferBase *prev, *next; /* live owning instances */
} BufferBase;

static BufferBase *live_head;
static PyObject *use_after_error; /* ptrbridge.UseAfterTransferError */
static PyObject *charp_fn;        /* lib.pb__charp (fallback) */
static PyObject *charp_ctype;     /* ffi.typeof("char *") */
/* cffi's exported C API (_cffi_backend._C_API, the table cffi-generated
 * modules use): entry 10 makes a pointer cdata of a given ctype. */
static PyObject *(*from_c_pointer)(char *, PyObject *);
static PyTypeObject BufferBaseType;

char *pb__charp(uintptr_t addr)
{
    return (char *)addr;
}

void **pb__cffi_exports(void)
{
    PyObject *backend = PyImport_ImportModule("_cffi_backend");
    PyObject *capsule = backend ? PyObject_GetAttrString(backend, "_C_API") : NULL;
    Py_XDECREF(backend);
    void **exports = NULL;
    if (capsule != NULL && PyCapsule_IsValid(capsule, "cffi"))
        exports = PyCapsule_GetPointer(capsule, "cffi");
    Py_XDECREF(capsule); /* _cffi_backend stays imported: the table outlives the capsule reference */
    PyErr_Clear();
    return exports;
}

PyObject *pb__charp_object(uintptr_t addr)
{
    if (from_c_pointer != NULL)
        return from_c_pointer((char *)addr, charp_ctype);
    PyObject *a = PyLong_FromSize_t(addr);
    if (a == NULL)
        return NULL;
    PyObject *ptr = PyObject_CallOneArg(charp_fn, a);
    Py_DECREF(a);
    return ptr;
}

static void link_live(BufferBase *b)
{
    b->prev = NULL;
    b->next = live_head;
    if (live_head != NULL)
        live_head->prev = b;
    live_head = b;
}

static void unlink_live(BufferBase *b)
{
    if (b->prev != NULL)
        b->prev->next = b->next;
    else if (live_head == b)
        live_head = b->next;
    if (b->next != NULL)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
}

/* Raises UseAfterTransferError for `what` on a given-up buffer.  NULL. */
static PyObject *gone(BufferBase *self, const char *what)
{
    PyObject *site = pb__site_text(self->site);
    const char *how = self->state == ST_TRANSFERRED
                          ? "transferred to C by CBuffer.transfer() (C owns it now and frees it with "
                            "pb_free)"
                          : "freed by Python (CBuffer.free() or the end of its with block)";
    PyErr_Format(use_after_error ? use_after_error : PyExc_RuntimeError,
                 "ptrbridge: %s after its memory was %s: %s(%zd) created at %U",
                 what, how, Py_TYPE(self)->tp_name, self->orig_size, site ? site : Py_None);
    Py_XDECREF(site);
    return NULL;
}

static int usable(BufferBase *self, const char *what)
{
    if (self->state == ST_TRANSFERRED || self->state == ST_FREED) {
        gone(self, what);
        return 0;
    }
    return 1;
}

static PyObject *bb_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"address", "size", "readonly", NULL};
    PyObject *address_obj;
    Py_ssize_t size = 0;
    int readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p", kwlist, &address_obj, &size, &readonly))
        return NULL;
    if (!PyLong_Check(address_obj) || PyBool_Check(address_obj)) {
        PyErr_Format(PyExc_TypeError, "ptrbridge: an address must be an int, not %s",
                     Py_TYPE(address_obj)->tp_name);
        return NULL;
    }
    unsigned long long address = PyLong_AsUnsignedLongLong(address_obj);
    if (PyErr_Occurred() || address > UINTPTR_MAX) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "ptrbridge: address %R is out of range for a pointer",
                     address_obj);
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "ptrbridge: buffer size must not be negative");
        return NULL;
    }
    if (address == 0 && size != 0) {
        PyErr_SetString(PyExc_ValueError, "ptrbridge: NULL address with a nonzero size");
        return NULL;
    }
    BufferBase *self = (BufferBase *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->ptr = (char *)(uintptr_t)address;
    self->size = self->orig_size = size;
    self->readonly = readonly;
    self->state = ST_VIEW;
    return (PyObject *)self;
}

static void bb_dealloc(BufferBase *self)
{
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->state == ST_OWNED) {
        unlink_live(self);
        pb__free_owned(self->ptr);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int bb_getbuffer(BufferBase *self, Py_buffer *view, int flags)
{
    if (!usable(self, "memoryview(CBuffer) or another buffer export")) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->size, self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void bb_releasebuffer(BufferBase *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

/* A new owning instance for a fresh block (pb__alloc_owned). */
static PyObject *bb_adopt(PyTypeObject *type, char *ptr, Py_ssize_t size, uint32_t site)
{
    BufferBase *self = (BufferBase *)type->tp_alloc(type, 0);
    if (self == NULL) {
        pb__free_owned(ptr);
        return NULL;
    }
    self->ptr = ptr;
    self->size = self->orig_size = size;
    self->state = ST_OWNED;
    self->site = site;
    link_live(self);
    return (PyObject *)self;
}

static PyObject *no_memory(const char *api, Py_ssize_t size)
{
    return PyErr_Format(PyExc_MemoryError,
                        "ptrbridge: %s: cannot allocate %zd bytes (%zd MiB) of C memory: out of memory", api,
                        size, size >> 20);
}

static PyObject *bb_alloc(PyObject *cls, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "ptrbridge.CBuffer: size must not be negative");
        return NULL;
    }
    uint32_t site = pb__site_capture();
    char *p = pb__alloc_owned((size_t)size, 1, site);
    if (p == NULL)
        return no_memory("CBuffer()", size);
    return bb_adopt((PyTypeObject *)cls, p, size, site);
}

/* Gets a contiguous read view of `data` for `api`, with a message that gives
 * the real reason when that is impossible.  Returns 0 or -1. */
static int get_view(PyObject *data, Py_buffer *view, const char *api)
{
    if (PyObject_TypeCheck(data, &BufferBaseType) && !usable((BufferBase *)data, api))
        return -1;
    if (PyObject_GetBuffer(data, view, PyBUF_ANY_CONTIGUOUS) == 0)
        return 0;
    if (!PyObject_CheckBuffer(data)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "ptrbridge: %s: %s does not export a buffer", api,
                     Py_TYPE(data)->tp_name);
        return -1;
    }
    /* Distinguish "not contiguous" from every other refusal (a released
     * memoryview, an exporter that failed). */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_buffer strided;
    if (PyObject_GetBuffer(data, &strided, PyBUF_FULL_RO) == 0) {
        int contiguous = PyBuffer_IsContiguous(&strided, 'A');
        PyBuffer_Release(&strided);
        if (!contiguous) {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            PyErr_Format(PyExc_TypeError,
                         "ptrbridge: %s: %s is not contiguous; copy it to bytes first "
                         "(bytes(obj) or numpy.ascontiguousarray)",
                         api, Py_TYPE(data)->tp_name);
            return -1;
        }
    } else {
        PyErr_Clear();
    }
    PyErr_NormalizeException(&type, &value, &tb);
    PyErr_Format(type ? type : PyExc_BufferError, "ptrbridge: %s: cannot read the buffer of %s: %S", api,
                 Py_TYPE(data)->tp_name, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
}

static PyObject *bb_copy(PyObject *cls, PyObject *arg)
{
    Py_buffer view;
    if (get_view(arg, &view, "CBuffer.copy()") < 0)
        return NULL;
    uint32_t site = pb__site_capture();
    char *p = pb__alloc_owned((size_t)view.len, 0, site);
    if (p == NULL) {
        Py_ssize_t len = view.len;
        PyBuffer_Release(&view);
        return no_memory("CBuffer.copy()", len);
    }
    memcpy(p, view.buf, (size_t)view.len);
    Py_ssize_t size = view.len;
    PyBuffer_Release(&view);
    return bb_adopt((PyTypeObject *)cls, p, size, site);
}

static int refuse_exported(BufferBase *self, const char *what)
{
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "ptrbridge: CBuffer.%s while %zd memoryview(s) or other exports still point at "
                     "it; release them first",
                     what, self->exports);
        return -1;
    }
    return 0;
}

static PyObject *bb_free(BufferBase *self, PyObject *unused)
{
    (void)unused;
    if (!usable(self, "CBuffer.free()"))
        return NULL;
    if (self->state != ST_OWNED) {
        PyErr_SetString(PyExc_TypeError, "ptrbridge: CBuffer.free(): this buffer does not own its memory");
        return NULL;
    }
    if (refuse_exported(self, "free()") < 0)
        return NULL;
    unlink_live(self);
    char *p = self->ptr;
    self->state = ST_FREED;
    self->ptr = NULL;
    self->size = 0;
    pb__free_owned(p);
    Py_RETURN_NONE;
}

static PyObject *bb_transfer(BufferBase *self, PyObject *unused)
{
    (void)unused;
    if (!usable(self, "CBuffer.transfer()"))
        return NULL;
    if (self->state != ST_OWNED) {
        PyErr_SetString(PyExc_TypeError,
                        "ptrbridge: CBuffer.transfer(): this buffer does not own its memory");
        return NULL;
    }
    if (refuse_exported(self, "transfer()") < 0)
        return NULL;
    PyObject *ptr = pb__charp_object((uintptr_t)self->ptr);
    if (ptr == NULL)
        return NULL;
    pb__alloc_set_transferred(self->ptr, 1);
    unlink_live(self);
    self->state = ST_TRANSFERRED;
    self->ptr = NULL;
    self->size = 0;
    return ptr;
}

static PyObject *bb_get_exports(BufferBase *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->exports);
}

static PyObject *bb_get_owns(BufferBase *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->state == ST_OWNED);
}

static PyObject *bb_get_address(BufferBase *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(self->ptr);
}

static PyObject *bb_get_state(BufferBase *self, void *closure)
{
    (void)closure;
    static const char *names[] = {"view", "owned", "transferred", "freed"};
    return PyUnicode_FromString(names[self->state]);
}

static PyObject *bb_get_orig_size(BufferBase *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->orig_size);
}

static PyObject *bb_get_site(BufferBase *self, void *closure)
{
    (void)closure;
    return pb__site_text(self->site);
}

static PyObject *bb_usable(BufferBase *self, PyObject *what)
{
    const char *w = PyUnicode_Check(what) ? PyUnicode_AsUTF8(what) : NULL;
    if (w == NULL)
        return NULL;
    if (!usable(self, w))
        return NULL;
    Py_RETURN_NONE;
}

static Py_ssize_t bb_length(BufferBase *self)
{
    if (!usable(self, "len(CBuffer)"))
        return -1;
    return self->size;
}

static PySequenceMethods bb_as_sequence = {
    .sq_length = (lenfunc)bb_length,
};

static PyMethodDef bb_methods[] = {
    {"_usable", (PyCFunction)bb_usable, METH_O,
     "_usable(what): UseAfterTransferError naming `what` once the memory was given up."},
    {"_alloc", (PyCFunction)bb_alloc, METH_O | METH_CLASS,
     "A new instance owning `size` zeroed bytes of tracked C memory."},
    {"copy", (PyCFunction)bb_copy, METH_O | METH_CLASS,
     "copy(data) -> CBuffer: a new CBuffer owning a C copy of any contiguous buffer."},
    {"_copy", (PyCFunction)bb_copy, METH_O | METH_CLASS, "Same as copy()."},
    {"free", (PyCFunction)bb_free, METH_NOARGS,
     "Free the memory now (instead of at garbage collection).  BufferError while exported."},
    {"transfer", (PyCFunction)bb_transfer, METH_NOARGS,
     "Hand ownership to C and return the char *; C frees it with pb_free.  BufferError while exported."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef bb_getset[] = {
    {"_exports", (getter)bb_get_exports, NULL, "Number of live buffer exports.", NULL},
    {"_address", (getter)bb_get_address, NULL, "Address of the memory (0 once given up).", NULL},
    {"_owns", (getter)bb_get_owns, NULL, "True while the object owns (and will free) its memory.", NULL},
    {"_size", (getter)bb_get_orig_size, NULL, "Size at creation (also after transfer/free).", NULL},
    {"_site", (getter)bb_get_site, NULL, "file.py:line where it was created.", NULL},
    {"state", (getter)bb_get_state, NULL, "owned, transferred or freed (view for a non-owning buffer).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyBufferProcs bb_as_buffer = {
    (getbufferproc)bb_getbuffer,
    (releasebufferproc)bb_releasebuffer,
};

static PyTypeObject BufferBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ptrbridge._native.BufferBase",
    .tp_basicsize = sizeof(BufferBase),
    .tp_dealloc = (destructor)bb_dealloc,
    .tp_as_buffer = &bb_as_buffer,
    .tp_as_sequence = &bb_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Exports C memory through the buffer protocol (base of ptrbridge.CBuffer).",
    .tp_weaklistoffset = offsetof(BufferBase, weakreflist),
    .tp_methods = bb_methods,
    .tp_getset = bb_getset,
    .tp_new = bb_new,
};

/* ---- module functions -------------------------------------------------------- */

/* buffers_init(UseAfterTransferError, lib.pb__charp, ffi.typeof("char *") or None).
 * With a ctype, char * cdata are made through cffi's exported C API
 * (_cffi_backend._C_API, the table cffi-generated modules copy; entry 10 is
 * "pointer from C"); with None, by calling lib.pb__charp.  Python checks the
 * fast path with charp_object() and turns it off if it is not right. */
static PyObject *m_buffers_init(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *err, *charp, *ctype;
    if (!PyArg_ParseTuple(args, "OOO", &err, &charp, &ctype))
        return NULL;
    Py_XSETREF(use_after_error, Py_NewRef(err));
    Py_XSETREF(charp_fn, Py_NewRef(charp));
    from_c_pointer = NULL;
    Py_CLEAR(charp_ctype);
    if (ctype == Py_None)
        Py_RETURN_NONE;
    void **exports = pb__cffi_exports();
    if (exports != NULL) {
        charp_ctype = Py_NewRef(ctype);
        from_c_pointer = (PyObject * (*)(char *, PyObject *)) exports[10];
    }
    return PyBool_FromLong(from_c_pointer != NULL);
}

static PyObject *m_charp_object(PyObject *self, PyObject *arg)
{
    (void)self;
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    return pb__charp_object((uintptr_t)p);
}

/* buffers_live() -> [CBuffer] of every live owning instance, newest first. */
static PyObject *m_buffers_live(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *out = PyList_New(0);
    for (BufferBase *b = live_head; out != NULL && b != NULL; b = b->next)
        if (PyList_Append(out, (PyObject *)b) < 0)
            Py_CLEAR(out);
    return out;
}

/* buffer_owner(address) -> the live CBuffer whose block starts at address, or None. */
static PyObject *m_buffer_owner(PyObject *self, PyObject *arg)
{
    (void)self;
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    for (BufferBase *b = live_head; b != NULL; b = b->next)
        if (b->ptr == p)
            return Py_NewRef((PyObject *)b);
    Py_RETURN_NONE;
}

/* transferred_blocks() -> [(address, size, site id)] of blocks C owns after a transfer. */
static PyObject *m_transferred_blocks(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    size_t cap = 0, n;
    uintptr_t *addr = NULL;
    size_t *size = NULL;
    uint32_t *site = NULL;
    for (;;) {
        n = pb__alloc_transferred(addr, size, site, cap);
        if (n <= cap)
            break;
        free(addr);
        free(size);
        free(site);
        cap = n + 64;
        addr = malloc(cap * sizeof *addr);
        size = malloc(cap * sizeof *size);
        site = malloc(cap * sizeof *site);
        if (addr == NULL || size == NULL || site == NULL) {
            free(addr);
            free(size);
            free(site);
            return PyErr_NoMemory();
        }
    }
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(Knk)", (unsigned long long)addr[i], (Py_ssize_t)size[i],
                                    (unsigned long)site[i]);
        if (t == NULL || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    free(addr);
    free(size);
    free(site);
    return out;
}

/* batch_copy(bufs, pointers_address, lengths_address): copies each buffer of
 * the list/tuple into its own Python-owned block; pointers[i] and lengths[i]
 * receive the block and its size.  On error every block made is freed. */
static PyObject *m_batch_copy(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *seq;
    unsigned long long pa, la;
    if (!PyArg_ParseTuple(args, "OKK", &seq, &pa, &la))
        return NULL;
    char **ptrs = (char **)(uintptr_t)pa;
    size_t *lens = (size_t *)(uintptr_t)la;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint32_t site = pb__site_capture();
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        if (get_view(items[i], &view, "CBuffer.copy_many()") < 0)
            goto fail;
        char *p = pb__alloc_owned((size_t)view.len, 0, site);
        if (p == NULL) {
            Py_ssize_t len = view.len;
            PyBuffer_Release(&view);
            no_memory("CBuffer.copy_many()", len);
            goto fail;
        }
        memcpy(p, view.buf, (size_t)view.len);
        ptrs[i] = p;
        lens[i] = (size_t)view.len;
        PyBuffer_Release(&view);
        continue;
    fail:
        for (Py_ssize_t j = 0; j < i; j++) {
            pb__free_owned(ptrs[j]);
            ptrs[j] = NULL;
        }
        return NULL;
    }
    return PyLong_FromUnsignedLong(site);
}

/* batch_release(pointers_address, n, transfer): transfer=1 hands every block
 * to C; transfer=0 frees them.  The pointer array is left as it is. */
static PyObject *m_batch_release(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long pa;
    Py_ssize_t n;
    int transfer;
    if (!PyArg_ParseTuple(args, "Knp", &pa, &n, &transfer))
        return NULL;
    char **ptrs = (char **)(uintptr_t)pa;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (transfer)
            pb__alloc_set_transferred(ptrs[i], 1);
        else
            pb__free_owned(ptrs[i]);
    }
    Py_RETURN_NONE;
}

/* write_unraisable(exc, obj): report an exception the way CPython reports
 * one it cannot raise (sys.unraisablehook), e.g. from a callback that C
 * called outside any checked call. */
static PyObject *write_unraisable(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *exc, *obj;
    if (!PyArg_ParseTuple(args, "OO", &exc, &obj))
        return NULL;
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_SetString(PyExc_TypeError, "write_unraisable: exc must be an exception instance");
        return NULL;
    }
    PyObject *tb = PyException_GetTraceback(exc); /* new reference or NULL */
    Py_INCREF(exc);
    Py_INCREF((PyObject *)Py_TYPE(exc));
    PyErr_Restore((PyObject *)Py_TYPE(exc), exc, tb); /* steals all three */
    PyErr_WriteUnraisable(obj);
    Py_RETURN_NONE;
}

static PyMethodDef buffer_functions[] = {
    {"buffers_init", m_buffers_init, METH_VARARGS, "buffers_init(UseAfterTransferError, charp)"},
    {"charp_object", m_charp_object, METH_O, "charp_object(address) -> char * cdata"},
    {"buffers_live", m_buffers_live, METH_NOARGS, "buffers_live() -> [CBuffer]"},
    {"buffer_owner", m_buffer_owner, METH_O, "buffer_owner(address) -> CBuffer or None"},
    {"transferred_blocks", m_transferred_blocks, METH_NOARGS,
     "transferred_blocks() -> [(address, size, site)]"},
    {"batch_copy", m_batch_copy, METH_VARARGS, "batch_copy(bufs, pointers, lengths) -> site"},
    {"batch_release", m_batch_release, METH_VARARGS, "batch_release(pointers, n, transfer)"},
    {"write_unraisable", write_unraisable, METH_VARARGS, "Report an exception through sys.unraisablehook."},
    {NULL, NULL, 0, NULL},
};

int pb__py_init(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *module = NULL;
    if (PyType_Ready(&BufferBaseType) < 0)
        goto out;
    {
        PyObject *name = PyUnicode_FromString("ptrbridge._native");
        if (name == NULL)
            goto out;
        module = PyImport_GetModule(name);
        Py_DECREF(name);
    }
    if (module == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ImportError, "ptrbridge._native is not imported");
        goto out;
    }
    if (PyObject_SetAttrString(module, "BufferBase", (PyObject *)&BufferBaseType) < 0)
        goto out;
    if (pb__add_functions(module, buffer_functions) < 0 || pb__py_sites_init(module) < 0 ||
        pb__py_handles_init(module) < 0 || pb__py_pins_init(module) < 0 ||
        pb__py_frames_init(module) < 0 || pb__py_quarantine_init(module) < 0 ||
        pb__py_calls_init(module) < 0 || pb__py_lends_init(module) < 0)
        goto out;
    rc = 0;
out:
    if (rc != 0)
        PyErr_Print();
    Py_XDECREF(module);
    PyGILState_Release(gil);
    return rc;
}
