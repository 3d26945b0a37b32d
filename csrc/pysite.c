/*
 * pysite.c - cheap creation sites for reports.
 *
 * Recording "file.py:12" for every Handle, CBuffer and pin would cost a frame
 * walk, a line-table lookup and string formatting each time.  Instead the
 * first Python frame outside the ptrbridge package is recorded as (code
 * object, instruction offset) and interned: the same call site always gets
 * the same small id, and the text is made only when a report needs it.
 *
 * Two open-addressing tables keyed by pointer, both touched only with the
 * GIL held: code object -> "is it inside ptrbridge?" (decided once per code
 * object by a Python predicate), and (code, offset) -> site id.  Both hold
 * strong references to their code objects, so a pointer key can never be
 * reused by another object.  At most MAX_SITES sites are interned; after
 * that new sites are recorded as 0 ("<unknown>:0").
 */
#include "pb_py.h"
#include "pb_internal.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
/* CPython 3.11: read the interpreter's frame stack directly, as profilers
 * (memray, py-spy) do.  PyEval_GetFrame() would allocate a frame object for
 * every caller that has none yet, which costs more than the rest of a pin.
 * Other versions use the public API below. */
#define PB_FAST_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif

#if PY_VERSION_HEX < 0x030B0000
/* PyFrame_GetLasti() is 3.11+.  Before that f_lasti is public: a byte offset
 * in 3.9, a code-unit index in 3.10; PyCode_Addr2Line takes bytes in both. */
#include <frameobject.h>
static int pb__frame_lasti(PyFrameObject *f)
{
#if PY_VERSION_HEX >= 0x030A0000
    return f->f_lasti < 0 ? 0 : f->f_lasti * (int)sizeof(_Py_CODEUNIT);
#else
    return f->f_lasti < 0 ? 0 : f->f_lasti;
#endif
}
#define PyFrame_GetLasti(f) pb__frame_lasti(f)
#endif

#define MAX_SITES (1u << 20)

struct code_entry {
    PyObject *code;
    int internal;
};

struct site_entry {
    PyObject *code;
    int lasti;
};

static struct code_entry *codes;
static size_t codes_cap, codes_used;
static struct site_entry *sites; /* sites[id - 1] */
static uint32_t sites_used, sites_cap;
static uint32_t *site_index; /* hash (code, lasti) -> id, 0 = empty */
static size_t index_cap;
static PyObject *is_internal; /* filename -> bool */

static size_t hash_ptr(const void *p, int salt)
{
    uint64_t x = (uint64_t)(uintptr_t)p ^ ((uint64_t)(unsigned)salt * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static int code_is_internal(PyObject *code)
{
    if (codes_used * 2 >= codes_cap) {
        size_t cap = codes_cap ? codes_cap * 2 : 256;
        struct code_entry *t = calloc(cap, sizeof *t);
        if (t == NULL)
            return 0;
        for (size_t i = 0; i < codes_cap; i++) {
            if (codes[i].code == NULL)
                continue;
            size_t j = hash_ptr(codes[i].code, 0) & (cap - 1);
            while (t[j].code != NULL)
                j = (j + 1) & (cap - 1);
            t[j] = codes[i];
        }
        free(codes);
        codes = t;
        codes_cap = cap;
    }
    size_t j = hash_ptr(code, 0) & (codes_cap - 1);
    for (; codes[j].code != NULL; j = (j + 1) & (codes_cap - 1))
        if (codes[j].code == code)
            return codes[j].internal;
    int internal = 0;
    if (is_internal != NULL) {
        PyObject *r = PyObject_CallOneArg(is_internal, ((PyCodeObject *)code)->co_filename);
        if (r == NULL)
            PyErr_Clear();
        else
            internal = PyObject_IsTrue(r) == 1;
        Py_XDECREF(r);
    }
    Py_INCREF(code);
    codes[j].code = code;
    codes[j].internal = internal;
    codes_used++;
    return internal;
}

static uint32_t intern_site(PyObject *code, int lasti)
{
    if (((size_t)sites_used + 1) * 2 > index_cap) {
        size_t cap = index_cap ? index_cap * 2 : 512;
        uint32_t *t = calloc(cap, sizeof *t);
        if (t == NULL)
            return 0;
        for (uint32_t id = 1; id <= sites_used; id++) {
            size_t j = hash_ptr(sites[id - 1].code, sites[id - 1].lasti) & (cap - 1);
            while (t[j] != 0)
                j = (j + 1) & (cap - 1);
            t[j] = id;
        }
        free(site_index);
        site_index = t;
        index_cap = cap;
    }
    size_t j = hash_ptr(code, lasti) & (index_cap - 1);
    for (; site_index[j] != 0; j = (j + 1) & (index_cap - 1)) {
        struct site_entry *e = &sites[site_index[j] - 1];
        if (e->code == code && e->lasti == lasti)
            return site_index[j];
    }
    if (sites_used >= MAX_SITES)
        return 0;
    if (sites_used == sites_cap) {
        uint32_t cap = sites_cap ? sites_cap * 2 : 256;
        struct site_entry *s = realloc(sites, cap * sizeof *s);
        if (s == NULL)
            return 0;
        sites = s;
        sites_cap = cap;
    }
    Py_INCREF(code);
    sites[sites_used].code = code;
    sites[sites_used].lasti = lasti;
    site_index[j] = ++sites_used;
    return sites_used;
}

uint32_t pb__site_capture(void)
{
#ifdef PB_FAST_FRAMES
    PyThreadState *tstate = PyThreadState_Get();
    for (_PyInterpreterFrame *f = tstate->cframe->current_frame; f != NULL; f = f->previous) {
        if (_PyFrame_IsIncomplete(f) || code_is_internal((PyObject *)f->f_code))
            continue;
        Py_ssize_t lasti = (f->prev_instr - _PyCode_CODE(f->f_code)) * (Py_ssize_t)sizeof(_Py_CODEUNIT);
        return intern_site((PyObject *)f->f_code, lasti < 0 ? 0 : (int)lasti);
    }
    return 0;
#else
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    if (frame == NULL)
        return 0;
    Py_INCREF(frame);
    for (;;) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        if (!code_is_internal((PyObject *)code)) {
            uint32_t id = intern_site((PyObject *)code, PyFrame_GetLasti(frame));
            Py_DECREF(code);
            Py_DECREF(frame);
            return id;
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        if (back == NULL)
            return 0;
        frame = back;
    }
#endif
}

/* ---- frame lines for the quarantine's fault reports -------------------------
 *
 * A quarantined lend records the Python stack of the lending call as site
 * ids (pb__site_capture_stack); its SIGSEGV handler can only copy bytes, so
 * the text of each frame, "/path/file.py:12 in name\n", is made once per
 * site, the first time a lend captures it, and never freed or changed.  The
 * handler reads it through pb__site_line(): a fixed array of chunk pointers,
 * each published with an atomic store, so a reader never sees a table being
 * moved. */

#define LINE_CHUNK 1024u
#define LINE_CHUNKS (MAX_SITES / LINE_CHUNK)

struct site_line {
    size_t where_len; /* "/path/file.py:12" is text[0, where_len) */
    char text[];      /* "/path/file.py:12 in name\n" */
};

typedef _Atomic(struct site_line *) line_cell;
static _Atomic(line_cell *) line_chunks[LINE_CHUNKS];

const char *pb__site_line(uint32_t site, size_t *where_len)
{
    if (site == 0 || site > MAX_SITES)
        return NULL;
    line_cell *chunk = atomic_load_explicit(&line_chunks[(site - 1) / LINE_CHUNK], memory_order_acquire);
    if (chunk == NULL)
        return NULL;
    struct site_line *line = atomic_load_explicit(&chunk[(site - 1) % LINE_CHUNK], memory_order_acquire);
    if (line == NULL)
        return NULL;
    *where_len = line->where_len;
    return line->text;
}

/* Makes the text of a site's frame line if it has none yet.  GIL held. */
static void publish_line(uint32_t site)
{
    if (site == 0 || site > sites_used)
        return;
    size_t where_len;
    if (pb__site_line(site, &where_len) != NULL)
        return;
    line_cell *chunk = atomic_load_explicit(&line_chunks[(site - 1) / LINE_CHUNK], memory_order_acquire);
    if (chunk == NULL) {
        chunk = calloc(LINE_CHUNK, sizeof *chunk);
        if (chunk == NULL)
            return;
        atomic_store_explicit(&line_chunks[(site - 1) / LINE_CHUNK], chunk, memory_order_release);
    }
    struct site_entry *e = &sites[site - 1];
    PyCodeObject *code = (PyCodeObject *)e->code;
    int lineno = PyCode_Addr2Line(code, e->lasti);
    Py_ssize_t file_len = 0, name_len = 0;
    const char *file = PyUnicode_AsUTF8AndSize(code->co_filename, &file_len);
    if (file == NULL) {
        PyErr_Clear();
        file = "?";
        file_len = 1;
    }
    const char *name = PyUnicode_AsUTF8AndSize(code->co_name, &name_len);
    if (name == NULL) {
        PyErr_Clear();
        name = "?";
        name_len = 1;
    }
    size_t cap = (size_t)file_len + (size_t)name_len + 32;
    struct site_line *line = malloc(sizeof *line + cap);
    if (line == NULL)
        return;
    int where = snprintf(line->text, cap, "%s:%d", file, lineno < 0 ? 0 : lineno);
    int all = snprintf(line->text + where, cap - (size_t)where, " in %s\n", name);
    if (where < 0 || all < 0) {
        free(line);
        return;
    }
    line->where_len = (size_t)where;
    atomic_store_explicit(&chunk[(site - 1) % LINE_CHUNK], line, memory_order_release);
}

/* Up to `max` site ids of the Python stack from `frame` (innermost first),
 * starting at the first frame outside ptrbridge, each with its frame line
 * made; returns how many (0 when `frame` is NULL, None or has no user frame).
 * GIL held. */
int pb__site_capture_stack(PyObject *frame, uint32_t *ids, int max)
{
    int n = 0;
    if (frame == NULL || !PyFrame_Check(frame))
        return 0;
    int outside = 0; /* ptrbridge's own frames are skipped until the first user frame */
#ifdef PB_FAST_FRAMES
    for (_PyInterpreterFrame *f = ((PyFrameObject *)frame)->f_frame; f != NULL && n < max; f = f->previous) {
        if (_PyFrame_IsIncomplete(f))
            continue;
        if (!outside && code_is_internal((PyObject *)f->f_code))
            continue;
        outside = 1;
        Py_ssize_t lasti = (f->prev_instr - _PyCode_CODE(f->f_code)) * (Py_ssize_t)sizeof(_Py_CODEUNIT);
        ids[n] = intern_site((PyObject *)f->f_code, lasti < 0 ? 0 : (int)lasti);
        publish_line(ids[n]);
        n++;
    }
#else
    PyFrameObject *f = (PyFrameObject *)frame;
    Py_INCREF(f);
    while (f != NULL && n < max) {
        PyCodeObject *code = PyFrame_GetCode(f);
        if (outside || !code_is_internal((PyObject *)code)) {
            outside = 1;
            ids[n] = intern_site((PyObject *)code, PyFrame_GetLasti(f));
            publish_line(ids[n]);
            n++;
        }
        Py_DECREF(code);
        PyFrameObject *back = n < max ? PyFrame_GetBack(f) : NULL;
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
#endif
    return n;
}

static PyObject *site_location(uint32_t site)
{
    if (site == 0 || site > sites_used)
        return Py_BuildValue("(si)", "<unknown>", 0);
    struct site_entry *e = &sites[site - 1];
    int line = PyCode_Addr2Line((PyCodeObject *)e->code, e->lasti);
    return Py_BuildValue("(Oi)", ((PyCodeObject *)e->code)->co_filename, line < 0 ? 0 : line);
}

PyObject *pb__site_text(uint32_t site)
{
    PyObject *loc = site_location(site);
    if (loc == NULL)
        return NULL;
    PyObject *name = PyTuple_GET_ITEM(loc, 0);
    Py_ssize_t len = PyUnicode_GET_LENGTH(name);
    Py_ssize_t slash = PyUnicode_FindChar(name, '/', 0, len, -1);
    PyObject *base = slash >= 0 ? PyUnicode_Substring(name, slash + 1, len) : Py_NewRef(name);
    PyObject *text = base ? PyUnicode_FromFormat("%U:%d", base, (int)PyLong_AsLong(PyTuple_GET_ITEM(loc, 1)))
                          : NULL;
    Py_XDECREF(base);
    Py_DECREF(loc);
    return text;
}

static PyObject *m_site_text(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long site = PyLong_AsUnsignedLong(arg);
    if (site == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return pb__site_text((uint32_t)site);
}

static PyObject *m_site_location(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long site = PyLong_AsUnsignedLong(arg);
    if (site == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return site_location((uint32_t)site);
}

static PyObject *m_site_capture(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(pb__site_capture());
}

static PyObject *m_sites_init(PyObject *self, PyObject *predicate)
{
    (void)self;
    Py_INCREF(predicate);
    Py_XSETREF(is_internal, predicate);
    Py_RETURN_NONE;
}

static PyMethodDef site_functions[] = {
    {"site_text", m_site_text, METH_O, "site_text(id) -> 'file.py:12'"},
    {"site_location", m_site_location, METH_O, "site_location(id) -> (filename, lineno)"},
    {"site_capture", m_site_capture, METH_NOARGS, "site_capture() -> id of the caller's site"},
    {"sites_init", m_sites_init, METH_O, "sites_init(is_internal(filename) -> bool)"},
    {NULL, NULL, 0, NULL},
};

int pb__add_functions(PyObject *module, PyMethodDef *defs)
{
    for (PyMethodDef *def = defs; def->ml_name != NULL; def++) {
        PyObject *fn = PyCFunction_New(def, NULL);
        if (fn == NULL)
            return -1;
        int rc = PyObject_SetAttrString(module, def->ml_name, fn);
        Py_DECREF(fn);
        if (rc < 0)
            return -1;
    }
    return 0;
}

int pb__py_sites_init(PyObject *module)
{
    return pb__add_functions(module, site_functions);
}
