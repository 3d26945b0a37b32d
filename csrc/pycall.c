/*
 * pycall.c - the checked call's common cases at levels 1 and 2, with no Python frame.
 *
 * A checked function (calls.py) is a Python closure, `checked(*args)`.  At
 * level 1 most calls pass only byte buffers, NULL and scalars, which need no
 * walk: the closure counts the call (instrumented), draws the quarantine
 * sample and calls C.  A CheckedCall does that in C and hands every other
 * call, unchanged, to the closure (its "slow" callable):
 *
 *   - level 1, and each argument it looks at is bytes, bytearray or None (a
 *     cffi function: the pointer parameters of its `plan`, and also an
 *     ffi.new / ffi.from_buffer cdata whose items hold no pointers, or whose
 *     pointer slots pyslots.c settles in C (NULL, pinned, C memory); ctypes:
 *     every argument, and also float, bool, str, an int while no freed
 *     memory is on record, and a structure, union or array, or a byref() of
 *     one, whose pointer slots are settled the same way; an instrumented
 *     function: any arguments while its walk could find nothing, no freed
 *     ptrbridge memory being on record and strict mode off): count the call
 *     if instrumented, draw the quarantine sample (a drawn call goes to the
 *     closure, which shadows it), call the raw function;
 *   - level 2, the quarantine off, and each argument it looks at is bytes,
 *     bytearray, None, or ffi.new memory or an ffi.from_buffer view whose
 *     pointer slots pyslots.c settles (ctypes: bytes, bytearray, None, float, bool, str, an int
 *     below vm.mmap_min_addr - a larger one is an address the closure
 *     checks - and a structure, union or array, or a byref() of one, whose
 *     slots are settled), at most FC_L2_MAX of them lent: count the call if
 *     instrumented, lend them (lends.c), call C, return them and queue them
 *     for the scan, record what a report would say about them (pylends.c),
 *     and every so many calls ask scanning.py whether a scan is due
 *     (fc_l2_due, which it sets);
 *   - level 0: call the raw function;
 *   - everything else (other arguments, keywords): the closure.
 *
 * A fast call has no frame that defer_exception or the R3 watchdog could
 * find, so it registers itself instead: a record in one list of the calls in
 * flight, with its thread and the frame that called it.  defer_exception
 * walks out from the callback to the first frame that is a checked call's or
 * called one of this thread's fast calls: that call takes the exception and
 * re-raises it when C returns.  The watchdog reads the list.  Records come
 * from a small pool on the heap, not the C stack (greenlet copies C stacks
 * away while a greenlet waits: nothing here may point into one), and are
 * unlinked by address, so calls may end in any order.  Everything here runs
 * with the GIL held: the globals, the counter, the pool and the list need no
 * other lock.
 *
 * The globals mirror Python state and are set from Python: the check level
 * (calls._on_level_change), the quarantine sampler (quarantine._arm: on/off
 * and the countdown of its random gap, which quarantine._tick reads too, so
 * there is one countdown), and the "calls" counted here, which
 * findings.counters() folds into its own.
 */
#include "pb_py.h"
#include "pb_quarantine.h"
#include "pb_slots.h"
#include "pb_internal.h"
#include "ptrbridge.h"

#include <stddef.h>
#include <stdio.h>

/* 3.11 and 3.12 make a frame object only when asked for one: a fast call notes
 * its caller's interpreter frame (free) and finds the frame object only when
 * defer_exception or the watchdog asks (as pyframes.c, the internal structs). */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define PB_LAZY_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif

enum {
    FC_CTYPES = 1,      /* look at every argument, ctypes rules (else the cffi plan) */
    FC_RECORD = 2,      /* instrumented: count the call; callbacks' exceptions are not deferred */
    FC_TICK_ALWAYS = 4, /* draw the sample for every call (else only for calls that lend a buffer) */
    FC_METHOD = 8,      /* instrumented ctypes __call__: args[0] is the function pointer */
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *raw;  /* the C function; FC_METHOD: the _CFuncPtr type whose tp_call calls C */
    PyObject *slow; /* the Python checked function */
    PyObject *name; /* for the watchdog */
    PyObject *dict;
    PyObject *weakrefs;
    PyObject *argtuple; /* reused for a raw function with no vectorcall (cffi's); items NULL when idle */
    Py_ssize_t *plan; /* cffi: the positions of the pointer parameters */
    Py_ssize_t nplan;
    int flags;
} CheckedCall;

/* The buffers a level-2 fast call lends (copied into its record: ownership.lookup names them). */
#define FC_L2_MAX 4
typedef struct {
    int n;
    uint64_t region[FC_L2_MAX];
    uintptr_t start[FC_L2_MAX];
    size_t size[FC_L2_MAX];
    PyObject *kind[FC_L2_MAX]; /* borrowed while the call runs: bytes, bytearray, or a cdata's ctype */
    PyObject *arg[FC_L2_MAX];  /* borrowed: the argument lent */
    unsigned owned;            /* bit k: kind[k] is a reference of ours (a view's description) */
} fc_lent;

static void fc_lent_release(fc_lent *l)
{
    for (int k = 0; k < l->n; k++)
        if (l->owned & (1u << k))
            Py_DECREF(l->kind[k]);
    l->owned = 0;
}

/* One fast call in flight. */
typedef struct fc_record {
    struct fc_record *prev, *next; /* the fast calls in flight (a free record: next in the pool) */
    CheckedCall *fn;
    PyObject *const *args;
    Py_ssize_t nargs;
    PyThreadState *tstate;
    void *caller; /* the calling frame (3.11, 3.12: the interpreter frame), or NULL */
    PyObject *exc;    /* owned: the exception a callback deferred to this call */
    unsigned long long seq;
    fc_lent lends;   /* level 2: what it lends (n == 0 otherwise) */
} fc_record;

static int fc_level;                  /* calls._level */
static int fc_sample_on;              /* quarantine._enabled */
static long long fc_countdown = 1;    /* > 1: answer False that many - 1 times; 1: True until re-armed */
static unsigned long long fc_calls;   /* calls counted here, not yet folded into findings */
static unsigned long long fc_seq;     /* numbers the calls in flight */
static PyObject *fc_freed;            /* ownership._freed: not empty = freed memory on record */
static PyObject *fc_shapes;           /* calls._arg_shapes: ctype -> (shape, plan, is_array, item size) */
static PyObject *fc_ctypes_plans;     /* calls._ctypes_plans: ctypes aggregate type -> plan or None */
static PyTypeObject *fc_carg;         /* type(ctypes.byref(...)) */
static PyObject *fc_ctypes_lends;     /* calls._CTYPES_LENDS */
static PyObject *fc_findings;         /* findings.__dict__ (its _strict) */
static PyObject *fc_strict_name;      /* "_strict" */
static PyObject *fc_strict_fn;        /* findings.strict */
static PyObject *fc_env_data;         /* os.environ._data, or NULL */
static PyObject *fc_env_key;          /* PTRBRIDGE_STRICT encoded as its key */
static PyObject *fc_strict_raw;       /* the raw value fc_strict_answer is for */
static int fc_strict_answer;
static PyTypeObject *fc_cdata_own;    /* type(ffi.new(...)) */
static PyTypeObject *fc_cdata_frombuf; /* type(ffi.from_buffer(...)) */
static PyObject *fc_flat;             /* calls._FLAT */
static PyObject *fc_zero;             /* 0 */
enum { FC_SHAPE_WALK = 1 }; /* calls._WALK */
static PyTypeObject CheckedCallType;
static PyTypeObject CheckedMethodType;
static unsigned long long fc_lends_counted; /* level-2 lends made here, not yet folded into findings */
static unsigned long long fc_l2_count;      /* level-2 fast calls that lent, not yet told to scanning.py */
static unsigned long long fc_l2_due = 1;    /* tell it when fc_l2_count reaches this (it sets it) */
static PyObject *fc_l2_hook;                /* scanning._fast_calls_due */
static PyObject *fc_l2_check;               /* _bindings.check: a PB_ERR_* code as its exception */
static PyObject *fc_l2_describe;            /* ownership.describe: a from_buffer view's text */
static fc_record fc_all = {&fc_all, &fc_all, NULL, NULL, 0, NULL, NULL, NULL, 0, {0, {0}, {0}, {0}, {NULL}, {NULL}, 0}};
static fc_record *fc_pool; /* free records */

/* cffi's CDataObject starts with its ctype (checked by fastcall_init on a sample). */
typedef struct {
    PyObject_HEAD
    PyObject *c_type;
} fc_cdata;

static int fc_tick(void)
{
    if (fc_countdown > 1) {
        fc_countdown--;
        return 0;
    }
    return 1;
}

/* Whether a cdata from ffi.new / ffi.from_buffer needs no look at level 1
 * (calls._arg_shape): its items hold no pointers (_FLAT), or every pointer
 * slot of its items is settled in C (_WALK: NULL, pinned, C memory; the
 * walk of calls._settled_cffi, by pyslots.c).  Either way it is lent. */
static int fc_settled_cdata(PyObject *arg, int level2, Py_ssize_t *items, Py_ssize_t *item_size)
{
    if (fc_shapes == NULL)
        return 0;
    PyObject *shape = PyDict_GetItemWithError(fc_shapes, ((fc_cdata *)arg)->c_type); /* borrowed */
    if (shape == NULL) {
        PyErr_Clear();
        return 0; /* not seen yet: the closure works it out and caches it */
    }
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != 4)
        return 0;
    PyObject *kind = PyTuple_GET_ITEM(shape, 0);
    Py_ssize_t count = 1;
    if (PyTuple_GET_ITEM(shape, 2) == Py_True) { /* an array: its items, as the closure counts them */
        count = PyObject_Length(arg);
        if (count < 0) {
            PyErr_Clear();
            return 0;
        }
    }
    if (items != NULL) {
        *items = count;
        *item_size = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, 3));
        if (*item_size == -1 && PyErr_Occurred())
            PyErr_Clear();
    }
    if (count == 0)
        count = 1;
    if (kind == fc_flat)
        return 1;
    if (!PyLong_Check(kind) || PyLong_AsLong(kind) != FC_SHAPE_WALK)
        return 0;
    int settled = pb__slots_settled(arg, PyTuple_GET_ITEM(shape, 1), count, level2);
    if (settled < 0) {
        PyErr_Clear();
        return 0;
    }
    return settled;
}

/* calls._settled_ctypes at level 1: a ctypes structure, union or array, or a
 * byref() of one, whose type holds no pointers or whose pointer slots
 * pyslots.c settles in C.  Its address is read through the buffer protocol
 * (ctypes exports its b_ptr), not from ctypes' private structs. */
static int fc_settled_ctypes(PyObject *arg, int level2, fc_lent *out)
{
    if (fc_ctypes_plans == NULL)
        return 0;
    PyObject *obj;
    if (Py_TYPE(arg) == fc_carg) {
        if ((obj = PyObject_GetAttrString(arg, "_obj")) == NULL) {
            PyErr_Clear();
            return 0;
        }
    } else {
        obj = Py_NewRef(arg);
    }
    int settled = 0;
    PyObject *plan = PyDict_GetItemWithError(fc_ctypes_plans, (PyObject *)Py_TYPE(obj)); /* borrowed */
    if (plan == Py_None && out == NULL) {
        settled = 1; /* holds no pointers */
    } else if (plan == Py_None || (plan != NULL && PyBytes_Check(plan))) {
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) == 0) {
            settled = plan == Py_None ? 1 : pb__slots_settled_at((uintptr_t)view.buf, plan, 1, level2);
            if (settled == 1 && out != NULL) { /* level 2: lent whole, as ownership.ctypes_extent has it */
                int k = out->n++;
                out->kind[k] = (PyObject *)Py_TYPE(obj); /* alive with obj, which arg holds */
                out->arg[k] = arg;
                out->start[k] = (uintptr_t)view.buf;
                out->size[k] = (size_t)view.len;
            }
            PyBuffer_Release(&view);
        } else {
            settled = -1;
        }
    }
    if (settled < 0 || PyErr_Occurred()) { /* not cached yet (the closure caches it), or not readable */
        PyErr_Clear();
        settled = 0;
    }
    Py_DECREF(obj);
    return settled;
}

static int fc_history(void)
{
    if (fc_freed == NULL)
        return 1;
    Py_ssize_t n = PyObject_Size(fc_freed);
    if (n < 0) {
        PyErr_Clear();
        return 1;
    }
    return n > 0;
}

/* findings.strict(), read as it reads itself: findings._strict if set, else
 * the answer for PTRBRIDGE_STRICT's raw value in os.environ's backing dict,
 * asked of findings.strict() again only when that value object changes.
 * -1: error set. */
static int fc_strict(void)
{
    if (fc_strict_fn == NULL)
        return 1; /* not initialised: as if strict, so that the closure decides */
    PyObject *forced = PyDict_GetItemWithError(fc_findings, fc_strict_name); /* borrowed */
    if (forced == Py_True || forced == Py_False)
        return forced == Py_True;
    if (forced == NULL && PyErr_Occurred())
        return -1;
    PyObject *raw = Py_None;
    if (fc_env_data != NULL) {
        raw = PyDict_GetItemWithError(fc_env_data, fc_env_key);
        if (raw == NULL) {
            if (PyErr_Occurred())
                return -1;
            raw = Py_None;
        }
        if (raw == fc_strict_raw)
            return fc_strict_answer;
    }
    PyObject *answer = PyObject_CallNoArgs(fc_strict_fn);
    if (answer == NULL)
        return -1;
    int on = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    if (on < 0)
        return -1;
    if (fc_env_data != NULL) {
        Py_XSETREF(fc_strict_raw, Py_NewRef(raw));
        fc_strict_answer = on;
    }
    return on;
}

/* Whether `arg` is lent whole to C (calls._unwalked_lent), for the sample's draw. */
static int fc_lends(PyObject *arg)
{
    PyTypeObject *kind = Py_TYPE(arg);
    if (kind == &PyBytes_Type || kind == &PyByteArray_Type || kind == fc_cdata_own || kind == fc_cdata_frombuf)
        return 1;
    if (fc_ctypes_lends == NULL)
        return 0;
    int is = PyObject_IsInstance(arg, fc_ctypes_lends);
    if (is < 0)
        PyErr_Clear();
    return is > 0;
}

/* An instrumented call at level 1 with no freed ptrbridge memory on record and
 * strict mode off: its walk could find nothing (calls._unwalked_lent), so any
 * arguments are taken.  1: taken, 0: the closure decides. */
static int fc_unwalked(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, int *lent)
{
    if (!(fn->flags & (FC_RECORD | FC_METHOD)) || fc_history())
        return 0;
    int strict = fc_strict();
    if (strict != 0) {
        if (strict < 0)
            PyErr_Clear();
        return 0;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTypeObject *kind = Py_TYPE(args[i]);
        if (kind == &CheckedCallType || kind == &CheckedMethodType)
            return 0; /* a checked function as an argument: the closure passes the raw one */
    }
    if (fc_sample_on) { /* the draw asks whether a buffer is lent */
        for (Py_ssize_t i = 0; i < nargs && !*lent; i++)
            *lent = fc_lends(args[i]);
    }
    return 1;
}

/* The arguments that need no walk by their kind (see the top of the file). */
static int fc_settled_by_kind(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, int *lent)
{
    if (fn->flags & FC_CTYPES) {
        for (Py_ssize_t i = 0; i < nargs; i++) {
            PyObject *arg = args[i];
            PyTypeObject *kind = Py_TYPE(arg);
            if (kind == &PyBytes_Type || kind == &PyByteArray_Type) {
                *lent = 1;
            } else if (kind == &PyLong_Type) {
                /* an address is checked against freed memory, when there is some */
                if (fc_history()) {
                    int positive = PyObject_RichCompareBool(arg, fc_zero, Py_GT);
                    if (positive != 0) {
                        if (positive < 0)
                            PyErr_Clear();
                        return 0;
                    }
                }
            } else if (arg != Py_None && kind != &PyFloat_Type && kind != &PyBool_Type &&
                       kind != &PyUnicode_Type) {
                if (!fc_settled_ctypes(arg, 0, NULL))
                    return 0;
                *lent = 1;
            }
        }
        return 1;
    }
    for (Py_ssize_t j = 0; j < fn->nplan; j++) {
        Py_ssize_t i = fn->plan[j];
        if (i >= nargs)
            return 0; /* too few arguments: the closure lets C raise */
        PyObject *arg = args[i];
        PyTypeObject *kind = Py_TYPE(arg);
        if (kind == &PyBytes_Type || kind == &PyByteArray_Type)
            *lent = 1;
        else if ((kind == fc_cdata_own || kind == fc_cdata_frombuf) && fc_settled_cdata(arg, 0, NULL, NULL))
            *lent = 1;
        else if (arg != Py_None)
            return 0;
    }
    return 1;
}

/* 1: the level-1 fast path takes these arguments (*lent: one is a buffer lent to C), 0: the closure. */
static int fc_settled(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, int *lent)
{
    if (fc_settled_by_kind(fn, args, nargs, lent))
        return 1;
    *lent = 0;
    return fc_unwalked(fn, args, nargs, lent);
}

/* Calls a raw function that takes only a tuple (a cffi function: no vectorcall) with a tuple
 * kept for it, instead of one made and freed per call (at level 2 each goes through the heap
 * map's hooks).  The tuple is untracked by the GC and its items are NULL between calls; one
 * still referenced after the call (the callee kept it) is left to its keeper, whole. */
static PyObject *fc_call_tuple(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *t = fn->argtuple;
    if (t == NULL || PyTuple_GET_SIZE(t) != nargs || Py_REFCNT(t) != 1) {
        if (t != NULL && Py_REFCNT(t) != 1) /* in use: a call of this function from a callback */
            return PyObject_Vectorcall(fn->raw, args, (size_t)nargs, NULL);
        if ((t = PyTuple_New(nargs)) == NULL)
            return NULL;
        PyObject_GC_UnTrack(t);
        Py_XSETREF(fn->argtuple, t);
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(t, i, Py_NewRef(args[i]));
    Py_INCREF(t);
    PyObject *result = PyObject_Call(fn->raw, t, NULL); /* tp_call, with the recursion and result checks */
    if (Py_REFCNT(t) == 2) {
        for (Py_ssize_t i = 0; i < nargs; i++) {
            PyObject *item = PyTuple_GET_ITEM(t, i);
            PyTuple_SET_ITEM(t, i, NULL);
            Py_DECREF(item);
        }
        Py_DECREF(t);
    } else { /* kept by someone: theirs now, items and all */
        fn->argtuple = NULL;
        Py_DECREF(t);
        Py_DECREF(t);
    }
    return result;
}

static PyObject *fc_call_raw(CheckedCall *fn, PyObject *const *args, size_t nargsf)
{
    if (!(fn->flags & FC_METHOD)) {
        Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
        if (nargs > 0 && PyVectorcall_Function(fn->raw) == NULL && Py_TYPE(fn->raw)->tp_call != NULL)
            return fc_call_tuple(fn, args, nargs);
        return PyObject_Vectorcall(fn->raw, args, nargsf, NULL);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *tuple = PyTuple_New(nargs - 1);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 1; i < nargs; i++)
        PyTuple_SET_ITEM(tuple, i - 1, Py_NewRef(args[i]));
    PyObject *result = ((PyTypeObject *)fn->raw)->tp_call(args[0], tuple, NULL);
    Py_DECREF(tuple);
    return result;
}

/* Whether this call goes to the closure; counts and draws for a call that does not. */
static int fc_wants_slow(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs)
{
    int level = fc_level;
    if ((fn->flags & FC_METHOD) && (nargs < 1 || !PyObject_TypeCheck(args[0], (PyTypeObject *)fn->raw)))
        return 1;
    if (level == 1) {
        int lent = 0;
        int skip = (fn->flags & FC_METHOD) ? 1 : 0;
        if (!fc_settled(fn, args + skip, nargs - skip, &lent))
            return 1;
        if (fc_sample_on && (lent || (fn->flags & FC_TICK_ALWAYS)) && fc_tick())
            return 1; /* drawn: the closure shadows this call (its own draw answers True too) */
        if (fn->flags & (FC_RECORD | FC_METHOD))
            fc_calls++;
    }
    return 0;
}

/* Calls C, registered as a call in flight; `tuple`: the arguments as a tuple, if the caller had one;
 * `lends`: what a level-2 call lends, or NULL. */
static PyObject *fc_run(CheckedCall *fn, PyObject *const *args, size_t nargsf, PyObject *tuple,
                        const fc_lent *lends)
{
    if (fn->flags & FC_METHOD)
        return fc_call_raw(fn, args, nargsf); /* as the raw call: callbacks' exceptions are not deferred */
    fc_record *rec = fc_pool;
    if (rec != NULL) {
        fc_pool = rec->next;
    } else if ((rec = PyMem_RawMalloc(sizeof *rec)) == NULL) {
        return PyErr_NoMemory();
    }
    rec->fn = fn;
    rec->args = args;
    rec->nargs = PyVectorcall_NARGS(nargsf);
    rec->tstate = PyThreadState_Get();
#ifdef PB_LAZY_FRAMES
    rec->caller = rec->tstate->cframe->current_frame;
#else
    rec->caller = PyEval_GetFrame();
#endif
    rec->exc = NULL;
    rec->seq = ++fc_seq;
    if (lends != NULL)
        rec->lends = *lends;
    else
        rec->lends.n = 0;
    rec->next = &fc_all;
    rec->prev = fc_all.prev;
    fc_all.prev->next = rec;
    fc_all.prev = rec;
    /* A ctypes function has no vectorcall: with a tuple at hand, spare it building another. */
    PyObject *result = tuple != NULL ? PyObject_Call(fn->raw, tuple, NULL) : fc_call_raw(fn, args, nargsf);
    rec->prev->next = rec->next;
    rec->next->prev = rec->prev;
    PyObject *exc = rec->exc;
    rec->next = fc_pool;
    fc_pool = rec;
    if (exc != NULL) {
        if (result != NULL) { /* a callback raised: C's result is dropped, the exception raised */
            Py_DECREF(result);
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            result = NULL;
        }
        Py_DECREF(exc);
    }
    return result;
}

/* Nothing can be mapped below vm.mmap_min_addr (read at import; 4096 if unreadable). */
static long long fc_no_address_below = 4096;

static void fc_read_mmap_min_addr(void)
{
    FILE *f = fopen("/proc/sys/vm/mmap_min_addr", "r");
    if (f == NULL)
        return;
    long long v;
    if (fscanf(f, "%lld", &v) == 1 && v >= 0)
        fc_no_address_below = v > 0 ? v : 1;
    fclose(f);
}

static int fc_l2_plan_args(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, fc_lent *out);

/* The extent of lend k, a bytes or bytearray, as the object has it now. */
static void fc_buffer_extent(fc_lent *l, int k)
{
    PyObject *arg = l->arg[k];
    if (l->kind[k] == (PyObject *)&PyBytes_Type) {
        l->start[k] = (uintptr_t)PyBytes_AS_STRING(arg);
        l->size[k] = (size_t)PyBytes_GET_SIZE(arg);
    } else {
        l->start[k] = (uintptr_t)PyByteArray_AS_STRING(arg);
        l->size[k] = (size_t)PyByteArray_GET_SIZE(arg);
    }
}

/* Level 2: 1 if the fast path takes these arguments, with what they lend in *out (release it
 * with fc_lent_release); 0: the closure's, nothing held. */
static int fc_l2_plan(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, fc_lent *out)
{
    out->n = 0;
    out->owned = 0;
    if (fc_l2_plan_args(fn, args, nargs, out))
        return 1;
    fc_lent_release(out);
    return 0;
}

static int fc_l2_plan_args(CheckedCall *fn, PyObject *const *args, Py_ssize_t nargs, fc_lent *out)
{
    if (fc_sample_on || fc_l2_hook == NULL || (fn->flags & FC_METHOD))
        return 0; /* quarantined lends, and instrumented ctypes methods: the closure */
    Py_ssize_t count = (fn->flags & FC_CTYPES) ? nargs : fn->nplan;
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t i = (fn->flags & FC_CTYPES) ? j : fn->plan[j];
        if (i >= nargs)
            return 0; /* too few arguments: the closure lets C raise */
        PyObject *arg = args[i];
        PyTypeObject *kind = Py_TYPE(arg);
        if (kind == &PyBytes_Type || kind == &PyByteArray_Type) {
            if (out->n == FC_L2_MAX)
                return 0;
            int k = out->n++;
            out->kind[k] = (PyObject *)kind;
            out->arg[k] = arg; /* its extent is read by fc_run_l2, after the site capture */
        } else if (arg == Py_None) {
            continue;
        } else if ((kind == fc_cdata_own || kind == fc_cdata_frombuf) && !(fn->flags & FC_CTYPES)) {
            /* ffi.new memory or an ffi.from_buffer view whose pointer slots are settled (NULL,
             * pinned, C memory): lent whole, its extent as ownership.cdata_extent has it (items
             * times the item size).  A view is described by what it views: ownership.describe
             * says (it reads that once per view), now, while the view is alive. */
            Py_ssize_t items, item_size;
            uintptr_t start;
            if (out->n == FC_L2_MAX || !fc_settled_cdata(arg, 1, &items, &item_size) || item_size < 0 ||
                pb__cdata_address(arg, &start) < 0 || (kind == fc_cdata_frombuf && fc_l2_describe == NULL)) {
                PyErr_Clear();
                return 0;
            }
            int k = out->n;
            out->kind[k] = ((fc_cdata *)arg)->c_type;
            out->arg[k] = arg;
            out->start[k] = start;
            out->size[k] = (size_t)items * (size_t)item_size;
            if (kind == fc_cdata_frombuf) {
                PyObject *text = PyObject_CallFunction(fc_l2_describe, "On", arg, (Py_ssize_t)out->size[k]);
                if (text == NULL || !PyUnicode_Check(text)) {
                    Py_XDECREF(text);
                    PyErr_Clear();
                    return 0;
                }
                out->kind[k] = text; /* owned: released by fc_lent_release */
                out->owned |= 1u << k;
            }
            out->n++;
        } else if (!(fn->flags & FC_CTYPES)) {
            return 0;
        } else if (kind == &PyLong_Type) {
            /* An int is an address the closure checks against freed memory at level 2, unless it
             * is below the lowest address anything can be mapped at (vm.mmap_min_addr): a length,
             * a flag, a file descriptor. */
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
            if (overflow > 0 || v >= fc_no_address_below || (v == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                return 0;
            }
        } else if (kind == &PyFloat_Type || kind == &PyBool_Type || kind == &PyUnicode_Type) {
            continue;
        } else if (out->n == FC_L2_MAX || !fc_settled_ctypes(arg, 1, out)) {
            return 0; /* a ctypes structure, union or array (or byref of one) whose slots are settled: lent */
        }
    }
    return 1;
}

/* The level-2 call of fc_l2_plan: lend, call, return, record, and tell scanning.py when it asked. */
static PyObject *fc_run_l2(CheckedCall *fn, PyObject *const *args, size_t nargsf, PyObject *tuple, fc_lent *l)
{
    if (fn->flags & FC_RECORD)
        fc_calls++;
    if (l->n == 0) {
        if (fn->nplan == 0 && !(fn->flags & FC_CTYPES))
            pb__quarantine_refresh_adopted(); /* C may read a kept buffer's shadow in this call */
        return fc_run(fn, args, nargsf, tuple, NULL);
    }
    uint32_t site = pb__site_capture(); /* may run Python (once per code object): another thread may */
    for (int k = 0; k < l->n; k++) {   /* resize a bytearray meanwhile, so its extent is read after it */
        if (l->kind[k] == (PyObject *)&PyBytes_Type || l->kind[k] == (PyObject *)&PyByteArray_Type)
            fc_buffer_extent(l, k);
    }
    for (int k = 0; k < l->n; k++) {
        if ((l->region[k] = pb__lend_add(l->start[k], l->size[k])) == 0) {
            while (k-- > 0)
                pb_region_remove(l->region[k]);
            return PyErr_NoMemory();
        }
    }
    fc_lends_counted += (unsigned long long)l->n;
    PyObject *result = fc_run(fn, args, nargsf, tuple, l);
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (result == NULL)
        PyErr_Fetch(&type, &value, &tb);
    int failed = 0;
    for (int k = 0; k < l->n; k++) {
        uint64_t target = pb__fl_take_ids(1);
        int queued = pb__lend_return(l->region[k], l->start[k], l->size[k], target);
        if (failed)
            continue;
        if (queued == 1) {
            failed = pb__fl_returned(target, l->start[k], l->size[k], l->kind[k], fn->name, site) < 0;
        } else if (queued < 0) {
            /* _bindings.check raises the PB_ERR_* code's exception; if it does not, say it here. */
            PyObject *r = fc_l2_check ? PyObject_CallFunction(fc_l2_check, "is", queued, "queueing a lent buffer for the scan")
                                      : NULL;
            if (r != NULL || !PyErr_Occurred()) {
                Py_XDECREF(r);
                PyErr_Format(PyExc_MemoryError, "ptrbridge: queueing a lent buffer for the scan failed (%d)", queued);
            }
            failed = 1;
        }
    }
    if (!failed && ++fc_l2_count >= fc_l2_due && result != NULL) {
        PyObject *r = PyObject_CallNoArgs(fc_l2_hook); /* scans if due; may raise a retention */
        if (r == NULL)
            failed = 1;
        Py_XDECREF(r);
    }
    if (failed) {
        Py_CLEAR(result);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    } else if (result == NULL) {
        PyErr_Restore(type, value, tb);
    }
    return result;
}

/* Level 2: 1 and *result if the C path took the call, 0 if it is the closure's. */
static int fc_try_l2(CheckedCall *fn, PyObject *const *args, size_t nargsf, PyObject *tuple, PyObject **result)
{
    fc_lent l;
    if (!fc_l2_plan(fn, args, PyVectorcall_NARGS(nargsf), &l))
        return 0;
    *result = fc_run_l2(fn, args, nargsf, tuple, &l);
    fc_lent_release(&l);
    return 1;
}

static PyObject *fc_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CheckedCall *fn = (CheckedCall *)self;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)
        return PyObject_Vectorcall(fn->slow, args, nargsf, kwnames);
    PyObject *result;
    if (fc_level == 2)
        return fc_try_l2(fn, args, nargsf, NULL, &result) ? result : PyObject_Vectorcall(fn->slow, args, nargsf, kwnames);
    if (fc_wants_slow(fn, args, PyVectorcall_NARGS(nargsf)))
        return PyObject_Vectorcall(fn->slow, args, nargsf, kwnames);
    return fc_run(fn, args, nargsf, NULL, NULL);
}

/* Called with a tuple: the wrapped ctypes functions (no vectorcall), and PyObject_Call of the others. */
static PyObject *fc_call(PyObject *self, PyObject *tuple, PyObject *kwargs)
{
    CheckedCall *fn = (CheckedCall *)self;
    PyObject *const *args = &PyTuple_GET_ITEM(tuple, 0);
    Py_ssize_t nargs = PyTuple_GET_SIZE(tuple);
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0)
        return PyObject_Call(fn->slow, tuple, kwargs);
    PyObject *result;
    if (fc_level == 2)
        return fc_try_l2(fn, args, (size_t)nargs, tuple, &result) ? result : PyObject_Call(fn->slow, tuple, kwargs);
    if (fc_wants_slow(fn, args, nargs))
        return PyObject_Call(fn->slow, tuple, kwargs);
    return fc_run(fn, args, (size_t)nargs, (fn->flags & FC_METHOD) ? NULL : tuple, NULL);
}

/* -- the type ----------------------------------------------------------- */

static PyObject *fc_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"raw", "slow", "name", "plan", "flags", NULL};
    PyObject *raw, *slow, *name, *plan;
    int flags;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOUOi:CheckedCall", keywords, &raw, &slow, &name, &plan,
                                     &flags))
        return NULL;
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "CheckedCall: slow must be callable");
        return NULL;
    }
    if ((flags & FC_METHOD) ? !PyType_Check(raw) || ((PyTypeObject *)raw)->tp_call == NULL : !PyCallable_Check(raw)) {
        PyErr_SetString(PyExc_TypeError, "CheckedCall: raw must be callable (a type with tp_call with FC_METHOD)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(plan, "CheckedCall: plan must be a sequence of positions");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t *positions = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    if (positions == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        positions[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (positions[i] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "CheckedCall: positions must be >= 0");
            PyMem_Free(positions);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    CheckedCall *fn = (CheckedCall *)type->tp_alloc(type, 0);
    if (fn == NULL) {
        PyMem_Free(positions);
        return NULL;
    }
    /* A wrapped ctypes function is called with a tuple (its proxy's __call__) and calls ctypes,
     * which takes a tuple: no vectorcall, so that the tuple reaches fc_call as it is. */
    fn->vectorcall = (flags & FC_CTYPES) && !(flags & FC_METHOD) ? NULL : fc_vectorcall;
    fn->raw = Py_NewRef(raw);
    fn->slow = Py_NewRef(slow);
    fn->name = Py_NewRef(name);
    fn->plan = positions;
    fn->nplan = n;
    fn->flags = flags;
    return (PyObject *)fn;
}

static int fc_traverse(PyObject *self, visitproc visit, void *arg)
{
    CheckedCall *fn = (CheckedCall *)self;
    Py_VISIT(fn->raw);
    Py_VISIT(fn->slow);
    Py_VISIT(fn->dict);
    Py_VISIT(fn->argtuple);
    return 0;
}

static int fc_clear(PyObject *self)
{
    CheckedCall *fn = (CheckedCall *)self;
    Py_CLEAR(fn->raw);
    Py_CLEAR(fn->slow);
    Py_CLEAR(fn->dict);
    Py_CLEAR(fn->argtuple);
    return 0;
}

static void fc_dealloc(PyObject *self)
{
    CheckedCall *fn = (CheckedCall *)self;
    PyObject_GC_UnTrack(self);
    if (fn->weakrefs != NULL)
        PyObject_ClearWeakRefs(self);
    fc_clear(self);
    Py_CLEAR(fn->name);
    PyMem_Free(fn->plan);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *fc_repr(PyObject *self)
{
    CheckedCall *fn = (CheckedCall *)self;
    return PyUnicode_FromFormat("<ptrbridge checked function %U>", fn->name);
}

/* A method: bound to the function pointer it is the __call__ of. */
static PyObject *fc_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *fc_get_slow(PyObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(((CheckedCall *)self)->slow);
}

static PyObject *fc_get_raw(PyObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(((CheckedCall *)self)->raw);
}

static PyGetSetDef fc_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"_ptrbridge_slow", fc_get_slow, NULL, "The Python checked function every other call goes to.", NULL},
    {"_ptrbridge_raw", fc_get_raw, NULL, "The C function (or the ctypes base type) called directly.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CheckedCallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptrbridge._native.CheckedCall",
    .tp_basicsize = sizeof(CheckedCall),
    .tp_dealloc = fc_dealloc,
    .tp_vectorcall_offset = offsetof(CheckedCall, vectorcall),
    .tp_repr = fc_repr,
    .tp_call = fc_call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "CheckedCall(raw, slow, name, plan, flags): a checked function's level-1 common case in C.",
    .tp_traverse = fc_traverse,
    .tp_clear = fc_clear,
    .tp_weaklistoffset = offsetof(CheckedCall, weakrefs),
    .tp_getset = fc_getset,
    .tp_dictoffset = offsetof(CheckedCall, dict),
    .tp_new = fc_new,
};

static PyTypeObject CheckedMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptrbridge._native.CheckedMethod",
    .tp_basicsize = sizeof(CheckedCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A CheckedCall that is a method (a ctypes function pointer type's __call__).",
    .tp_traverse = fc_traverse,
    .tp_clear = fc_clear,
    .tp_descr_get = fc_descr_get,
    .tp_call = fc_call,
    .tp_vectorcall_offset = offsetof(CheckedCall, vectorcall),
};

/* -- module functions ---------------------------------------------------- */

/* The frame object that made the fast call `rec` (new reference), or None. */
static PyObject *fc_caller_frame(fc_record *rec)
{
    if (rec->caller == NULL)
        Py_RETURN_NONE;
#ifdef PB_LAZY_FRAMES
    /* The caller is suspended in the call: it is on its thread's chain of frames. */
    PyFrameObject *frame = PyThreadState_GetFrame(rec->tstate);
    while (frame != NULL && frame->f_frame != (_PyInterpreterFrame *)rec->caller) {
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    if (frame == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return (PyObject *)frame;
#else
    return Py_NewRef((PyObject *)rec->caller);
#endif
}

/* fastcall_init(freed, arg_shapes, flat, sample_cdata, its_ctype, frombuf_type) */
static PyObject *m_fastcall_init(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *freed, *shapes, *flat, *sample, *ctype, *frombuf;
    if (!PyArg_ParseTuple(args, "OO!OOOO!", &freed, &PyDict_Type, &shapes, &flat, &sample, &ctype,
                          &PyType_Type, &frombuf))
        return NULL;
    Py_XSETREF(fc_freed, Py_NewRef(freed));
    Py_XSETREF(fc_shapes, Py_NewRef(shapes));
    Py_XSETREF(fc_flat, Py_NewRef(flat));
    /* Read the ctype of a cdata directly only if cffi's layout is the one expected. */
    if (((fc_cdata *)sample)->c_type == ctype) {
        Py_XSETREF(fc_cdata_own, (PyTypeObject *)Py_NewRef(Py_TYPE(sample)));
        Py_XSETREF(fc_cdata_frombuf, (PyTypeObject *)Py_NewRef(frombuf));
    }
    return PyBool_FromLong(fc_cdata_own != NULL);
}

static PyObject *m_fastcall_init_ctypes(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *plans, *carg;
    if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &plans, &PyType_Type, &carg))
        return NULL;
    Py_XSETREF(fc_ctypes_plans, Py_NewRef(plans));
    Py_XSETREF(fc_carg, (PyTypeObject *)Py_NewRef(carg));
    Py_RETURN_NONE;
}

static PyObject *m_fastcall_init_strict(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *findings, *strict, *env, *key, *lends;
    if (!PyArg_ParseTuple(args, "O!OOOO!", &PyDict_Type, &findings, &strict, &env, &key, &PyTuple_Type, &lends))
        return NULL;
    if (!PyCallable_Check(strict) || (env != Py_None && !PyDict_Check(env))) {
        PyErr_SetString(PyExc_TypeError, "fastcall_init_strict: strict must be callable, env a dict or None");
        return NULL;
    }
    if (fc_strict_name == NULL && (fc_strict_name = PyUnicode_InternFromString("_strict")) == NULL)
        return NULL;
    Py_XSETREF(fc_findings, Py_NewRef(findings));
    Py_XSETREF(fc_strict_fn, Py_NewRef(strict));
    Py_XSETREF(fc_env_data, env == Py_None ? NULL : Py_NewRef(env));
    Py_XSETREF(fc_env_key, Py_NewRef(key));
    Py_XSETREF(fc_ctypes_lends, Py_NewRef(lends));
    Py_CLEAR(fc_strict_raw);
    Py_RETURN_NONE;
}

static PyObject *m_fastcall_level(PyObject *self, PyObject *arg)
{
    (void)self;
    long level = PyLong_AsLong(arg);
    if (level == -1 && PyErr_Occurred())
        return NULL;
    fc_level = (int)level;
    Py_RETURN_NONE;
}

/* sample_arm(on, gap): the quarantine sampler; the gap-th draw from now answers True. */
static PyObject *m_sample_arm(PyObject *self, PyObject *args)
{
    (void)self;
    int on;
    long long gap;
    if (!PyArg_ParseTuple(args, "pL", &on, &gap))
        return NULL;
    fc_sample_on = on;
    fc_countdown = gap < 1 ? 1 : gap;
    Py_RETURN_NONE;
}

static PyObject *m_sample_tick(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(fc_tick());
}

/* The calls counted on the fast path since the last take (and zero them). */
static PyObject *m_fastcall_take_calls(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    unsigned long long n = fc_calls;
    fc_calls = 0;
    return PyLong_FromUnsignedLongLong(n);
}

/* {calling frame or None: seq} of this thread's fast calls in flight (the latest call of a
 * frame, or of no frame, wins). */
static PyObject *m_fastcall_callers(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyThreadState *tstate = PyThreadState_Get();
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (fc_record *rec = fc_all.next; rec != &fc_all; rec = rec->next) {
        if (rec->tstate != tstate)
            continue;
        PyObject *caller = fc_caller_frame(rec);
        PyObject *seq = caller != NULL ? PyLong_FromUnsignedLongLong(rec->seq) : NULL;
        int rc = seq != NULL ? PyDict_SetItem(out, caller, seq) : -1;
        Py_XDECREF(caller);
        Py_XDECREF(seq);
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* fastcall_defer(seq, exc): defer exc to the fast call `seq` (of this thread): True, or False
 * if it is instrumented (it behaves as the raw call) or gone.  The first exception wins; a
 * later one becomes its __context__ (if it has none). */
static PyObject *m_fastcall_defer(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long seq;
    PyObject *exc;
    if (!PyArg_ParseTuple(args, "KO", &seq, &exc))
        return NULL;
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_SetString(PyExc_TypeError, "fastcall_defer: expected an exception instance");
        return NULL;
    }
    fc_record *rec = fc_all.next;
    while (rec != &fc_all && rec->seq != seq)
        rec = rec->next;
    if (rec == &fc_all || (rec->fn->flags & FC_RECORD))
        Py_RETURN_FALSE;
    if (rec->exc == NULL) {
        rec->exc = Py_NewRef(exc);
    } else if (exc != rec->exc) {
        PyObject *context = PyException_GetContext(rec->exc);
        if (context == NULL)
            PyException_SetContext(rec->exc, Py_NewRef(exc));
        Py_XDECREF(context);
    }
    Py_RETURN_TRUE;
}

/* [(seq, name, args, calling frame or None)] of every fast call in flight (the R3 watchdog). */
static PyObject *m_fastcall_in_flight(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (fc_record *rec = fc_all.next; rec != &fc_all; rec = rec->next) {
        PyObject *items = PyTuple_New(rec->nargs);
        if (items == NULL)
            goto fail;
        for (Py_ssize_t i = 0; i < rec->nargs; i++)
            PyTuple_SET_ITEM(items, i, Py_NewRef(rec->args[i]));
        PyObject *caller = fc_caller_frame(rec);
        if (caller == NULL) {
            Py_DECREF(items);
            goto fail;
        }
        PyObject *entry = Py_BuildValue("(KONN)", rec->seq, rec->fn->name, items, caller);
        if (entry == NULL || PyList_Append(out, entry) < 0) {
            Py_XDECREF(entry);
            goto fail;
        }
        Py_DECREF(entry);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* fastcall_init_l2(hook, check, describe): scanning._fast_calls_due, _bindings.check and
 * ownership.describe; the level-2 path on. */
static PyObject *m_fastcall_init_l2(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *hook, *check, *describe;
    if (!PyArg_ParseTuple(args, "OOO", &hook, &check, &describe))
        return NULL;
    Py_XSETREF(fc_l2_hook, Py_NewRef(hook));
    Py_XSETREF(fc_l2_check, Py_NewRef(check));
    Py_XSETREF(fc_l2_describe, Py_NewRef(describe));
    Py_RETURN_NONE;
}

/* The level-2 fast calls that lent since the last take (and zero them). */
static PyObject *m_fastcall_take_l2(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    unsigned long long n = fc_l2_count;
    fc_l2_count = 0;
    return PyLong_FromUnsignedLongLong(n);
}

/* fastcall_scan_due(n): call the hook once n level-2 fast calls have lent (n >= 1). */
static PyObject *m_fastcall_scan_due(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    fc_l2_due = n ? n : 1;
    Py_RETURN_NONE;
}

/* The lends made on the fast path since the last take (and zero them). */
static PyObject *m_fastcall_take_lends(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    unsigned long long n = fc_lends_counted;
    fc_lends_counted = 0;
    return PyLong_FromUnsignedLongLong(n);
}

/* fastcall_lent_region(region_id) -> None or (start, size, description): a lend of a fast call in flight. */
static PyObject *m_fastcall_lent_region(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    for (fc_record *rec = fc_all.next; rec != &fc_all; rec = rec->next) {
        for (int k = 0; k < rec->lends.n; k++) {
            if (rec->lends.region[k] == id)
                return Py_BuildValue("(KnN)", (unsigned long long)rec->lends.start[k], (Py_ssize_t)rec->lends.size[k],
                                     pb__fl_description(rec->lends.kind[k], rec->lends.size[k]));
        }
    }
    Py_RETURN_NONE;
}

/* In a forked child only the forking thread lives on: drop the other threads' calls. */
static PyObject *m_fastcall_after_fork(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyThreadState *tstate = PyThreadState_Get();
    fc_record *rec = fc_all.next;
    while (rec != &fc_all) {
        fc_record *next = rec->next;
        if (rec->tstate != tstate) {
            rec->prev->next = rec->next;
            rec->next->prev = rec->prev;
            Py_CLEAR(rec->exc);
            rec->next = fc_pool;
            fc_pool = rec;
        }
        rec = next;
    }
    Py_RETURN_NONE;
}

static PyMethodDef call_functions[] = {
    {"fastcall_init", m_fastcall_init, METH_VARARGS,
     "fastcall_init(freed, arg_shapes, FLAT, sample_cdata, its_ctype, frombuf_type) -> cdata fast path on"},
    {"fastcall_init_ctypes", m_fastcall_init_ctypes, METH_VARARGS,
     "fastcall_init_ctypes(ctypes_plans, byref_type): the ctypes aggregates' fast path"},
    {"fastcall_init_strict", m_fastcall_init_strict, METH_VARARGS,
     "fastcall_init_strict(findings.__dict__, findings.strict, env_data, env_key, ctypes_lends):\n"
     "what instrumented level-1 calls need to know that a walk can find nothing"},
    {"fastcall_level", m_fastcall_level, METH_O, "fastcall_level(level): the check level the fast path sees"},
    {"sample_arm", m_sample_arm, METH_VARARGS, "sample_arm(on, gap): arm the quarantine sampler"},
    {"sample_tick", m_sample_tick, METH_NOARGS, "sample_tick() -> whether this lend is drawn"},
    {"fastcall_take_calls", m_fastcall_take_calls, METH_NOARGS, "fastcall_take_calls() -> calls counted"},
    {"fastcall_callers", m_fastcall_callers, METH_NOARGS,
     "fastcall_callers() -> {calling frame or None: seq} of this thread's fast calls"},
    {"fastcall_defer", m_fastcall_defer, METH_VARARGS, "fastcall_defer(seq, exc) -> taken by that fast call"},
    {"fastcall_in_flight", m_fastcall_in_flight, METH_NOARGS,
     "fastcall_in_flight() -> [(seq, name, args, frame)]"},
    {"fastcall_after_fork", m_fastcall_after_fork, METH_NOARGS, "fastcall_after_fork(): in a forked child"},
    {"fastcall_init_l2", m_fastcall_init_l2, METH_VARARGS,
     "fastcall_init_l2(hook, check, describe): level 2's fast path (hook: scanning._fast_calls_due)"},
    {"fastcall_take_l2", m_fastcall_take_l2, METH_NOARGS, "fastcall_take_l2() -> level-2 fast calls that lent"},
    {"fastcall_scan_due", m_fastcall_scan_due, METH_O, "fastcall_scan_due(n): call the hook after n more"},
    {"fastcall_take_lends", m_fastcall_take_lends, METH_NOARGS, "fastcall_take_lends() -> lends counted"},
    {"fastcall_lent_region", m_fastcall_lent_region, METH_O,
     "fastcall_lent_region(region_id) -> None or (start, size, description)"},
    {NULL, NULL, 0, NULL},
};

int pb__py_calls_init(PyObject *module)
{
    fc_read_mmap_min_addr();
    if (fc_zero == NULL && (fc_zero = PyLong_FromLong(0)) == NULL)
        return -1;
    CheckedMethodType.tp_base = &CheckedCallType;
    if (PyType_Ready(&CheckedCallType) < 0 || PyType_Ready(&CheckedMethodType) < 0)
        return -1;
    if (PyObject_SetAttrString(module, "CheckedCall", (PyObject *)&CheckedCallType) < 0 ||
        PyObject_SetAttrString(module, "CheckedMethod", (PyObject *)&CheckedMethodType) < 0)
        return -1;
    PyObject *constants[][2] = {
        {PyUnicode_FromString("FC_CTYPES"), PyLong_FromLong(FC_CTYPES)},
        {PyUnicode_FromString("FC_RECORD"), PyLong_FromLong(FC_RECORD)},
        {PyUnicode_FromString("FC_TICK_ALWAYS"), PyLong_FromLong(FC_TICK_ALWAYS)},
        {PyUnicode_FromString("FC_METHOD"), PyLong_FromLong(FC_METHOD)},
    };
    int rc = 0;
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
        if (rc == 0 && (constants[i][0] == NULL || constants[i][1] == NULL ||
                        PyObject_SetAttr(module, constants[i][0], constants[i][1]) < 0))
            rc = -1;
        Py_XDECREF(constants[i][0]);
        Py_XDECREF(constants[i][1]);
    }
    if (rc < 0)
        return -1;
    return pb__add_functions(module, call_functions);
}
