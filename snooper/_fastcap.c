/* The capture hot path in C: TPACKET_V3 block walk + xxh3 dedupe window + packing into batches.
 *
 * It does exactly what snooper/ring.py (walk_block), snooper/dedupe.py (Dedupe.filter) and
 * appliance/framebatch.py (pack) do together in Python, the pure-Python engine in snooper/engine.py,
 * and tests/test_fastcap.py holds the two to byte-identical batches and equal counters.  Per frame:
 * the 16-byte record header <qII (time ns, wire length, captured length) and the captured bytes are
 * written at the end of the open batch, the bytes are hashed there (xxh3-64 seeded with the wire
 * length, Debian's libxxhash), and the record is kept (the batch end advances) or dropped as a
 * duplicate.  A batch of batch_size frames becomes one bytes object in `ready`.
 *
 * The dedupe window: two generations of hash -> first-time tables (open addressing), the older
 * dropped every window; a frame is a duplicate when its twin was kept 0..window ns earlier; the
 * current table is looked up first, the previous one only when the hash is not in the current one
 * (docs/ARCHITECTURE.md, "Facts: capture").
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <xxhash.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring headers and the record format are read and written little-endian"
#endif

#define REC_HDR 16
#define PKT_HDR 48                   /* sizeof(struct tpacket3_hdr) */
#define TP_STATUS_USER 1u
#define TP_STATUS_VLAN_VALID 0x10u
#define TP_STATUS_VLAN_TPID_VALID 0x40u
#define SIGN 0x8000000000000000ull

typedef struct {
    uint64_t key;
    uint64_t tsx;                    /* the time xor SIGN: 0 marks a free slot, so fresh zeroed pages are empty */
} Slot;

typedef struct {
    Slot *slots;
    size_t mask;                     /* capacity - 1, capacity a power of two */
    size_t used;
} Table;

typedef struct {
    PyObject_HEAD
    int64_t window;                  /* ns; 0: dedupe off */
    int64_t rotate_at;
    int rotated;                     /* rotate_at is set */
    Table cur, prev;
    Py_ssize_t snaplen, batch_size;
    unsigned char *buf;              /* the open batch: packed records */
    size_t len, cap;
    Py_ssize_t n;
    unsigned long long wire_bytes;
    int64_t first_ns, last_ns;       /* min and max time in the open batch */
    PyObject *ready;                 /* list of (bytes, n, wire_bytes, first_ns, last_ns) */
} Walker;

/* --- the tables -------------------------------------------------------------------------------- */

/* Anonymous memory, on huge pages where the kernel offers them (a lookup is a cache miss; without them a TLB
 * miss as well). Fresh pages read as zeros: an empty table costs nothing to set up. */
static int table_init(Table *t, size_t cap) {
    void *m = mmap(NULL, cap * sizeof(Slot), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        PyErr_NoMemory();
        return -1;
    }
#ifdef MADV_HUGEPAGE
    if (cap * sizeof(Slot) >= (2u << 20))
        madvise(m, cap * sizeof(Slot), MADV_HUGEPAGE);
#endif
    t->slots = m;
    t->mask = cap - 1;
    t->used = 0;
    return 0;
}

static void table_free(Table *t) {
    if (t->slots)
        munmap(t->slots, (t->mask + 1) * sizeof(Slot));
    t->slots = NULL;
}

static inline int64_t slot_ts(const Slot *s) {
    return (int64_t)(s->tsx ^ SIGN);
}

static Slot *table_find(const Table *t, uint64_t key) {
    size_t i = (size_t)key & t->mask;
    for (;;) {
        Slot *s = &t->slots[i];
        if (!s->tsx || s->key == key)
            return s;
        i = (i + 1) & t->mask;
    }
}

static int table_grow(Table *t) {
    Table bigger;
    if (table_init(&bigger, (t->mask + 1) * 2) < 0)
        return -1;
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->slots[i].tsx) {
            *table_find(&bigger, t->slots[i].key) = t->slots[i];
            bigger.used++;
        }
    }
    table_free(t);
    *t = bigger;
    return 0;
}

/* Empty a table; one that held far less than its room shrinks, so memory follows the traffic. */
static int table_clear(Table *t) {
    size_t cap = t->mask + 1;
    if (cap > 4096 && t->used * 8 < cap) {
        size_t want = 4096;
        while (want < t->used * 4)
            want *= 2;
        table_free(t);
        return table_init(t, want);
    }
    memset(t->slots, 0, cap * sizeof(Slot));
    t->used = 0;
    return 0;
}

static int rotate(Walker *w, int64_t ts) {
    if (w->rotated) {
        if (ts < w->rotate_at + w->window) {      /* previous = current, current = {} */
            Table old = w->prev;
            w->prev = w->cur;
            w->cur = old;
            if (table_clear(&w->cur) < 0)
                return -1;
        } else {                                  /* a gap longer than two windows empties both */
            if (table_clear(&w->cur) < 0 || table_clear(&w->prev) < 0)
                return -1;
        }
    }
    w->rotate_at = ts + w->window;
    w->rotated = 1;
    return 0;
}

/* --- the open batch ------------------------------------------------------------------------------ */

static int reserve(Walker *w, size_t more) {
    if (w->len + more <= w->cap)
        return 0;
    size_t cap = w->cap ? w->cap : 65536;
    while (cap < w->len + more)
        cap *= 2;
    unsigned char *b = PyMem_Realloc(w->buf, cap);
    if (!b) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = b;
    w->cap = cap;
    return 0;
}

static int finish_batch(Walker *w) {
    PyObject *item = Py_BuildValue("(y#nKLL)", (const char *)w->buf, (Py_ssize_t)w->len, w->n,
                                   w->wire_bytes, (long long)w->first_ns, (long long)w->last_ns);
    if (!item)
        return -1;
    int rc = PyList_Append(w->ready, item);
    Py_DECREF(item);
    w->len = 0;
    w->n = 0;
    w->wire_bytes = 0;
    return rc;
}

/* The record (header + caplen bytes) is written at buf+len: keep it (1), drop it as a duplicate (0), or fail (-1). */
static int commit(Walker *w, int64_t ts, uint32_t wire, uint32_t caplen, const uint64_t *hashed) {
    unsigned char *rec = w->buf + w->len;
    if (w->window > 0) {
        if ((!w->rotated || ts >= w->rotate_at) && rotate(w, ts) < 0)
            return -1;
        uint64_t h = hashed ? *hashed : XXH3_64bits_withSeed(rec + REC_HDR, caplen, (XXH64_hash_t)wire);
        Slot *s = table_find(&w->cur, h);
        const Slot *first = s->tsx ? s : table_find(&w->prev, h);
        if (first->tsx && ts - slot_ts(first) >= 0 && ts - slot_ts(first) <= w->window)
            return 0;
        int fresh = !s->tsx;
        s->key = h;
        s->tsx = (uint64_t)ts ^ SIGN;
        if (fresh && ++w->cur.used * 2 > w->cur.mask + 1 && table_grow(&w->cur) < 0)
            return -1;
    }
    memcpy(rec, &ts, 8);
    memcpy(rec + 8, &wire, 4);
    memcpy(rec + 12, &caplen, 4);
    w->len += REC_HDR + caplen;
    if (w->n == 0 || ts < w->first_ns)
        w->first_ns = ts;
    if (w->n == 0 || ts > w->last_ns)
        w->last_ns = ts;
    w->n++;
    w->wire_bytes += wire;
    if (w->n >= w->batch_size && finish_batch(w) < 0)
        return -1;
    return 1;
}

/* commit() and the counters: captured, duplicates, kept but shorter than on the wire. */
static int tally(Walker *w, int64_t ts, uint32_t wire, size_t len, const uint64_t *hashed, long long *captured,
                 long long *dups, long long *trunc) {
    int kept = commit(w, ts, wire, (uint32_t)len, hashed);
    if (kept < 0)
        return -1;
    ++*captured;
    if (!kept)
        ++*dups;
    else if (wire > len)
        ++*trunc;
    return 0;
}

/* --- the type ------------------------------------------------------------------------------------ */

/* a Walker made with __new__ and never __init__'d has no tables and no batch list: every method says so */
static PyObject *not_ready(void) {
    PyErr_SetString(PyExc_RuntimeError, "Walker used before __init__");
    return NULL;
}

static int Walker_init(Walker *w, PyObject *args, PyObject *kw) {
    static char *names[] = {"window_ns", "snaplen", "batch_size", NULL};
    long long window;
    Py_ssize_t snaplen, batch_size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Lnn", names, &window, &snaplen, &batch_size))
        return -1;
    if (window < 0 || snaplen < 1 || batch_size < 1) {
        PyErr_SetString(PyExc_ValueError, "window_ns >= 0, snaplen >= 1 and batch_size >= 1");
        return -1;
    }
    w->window = window;
    w->snaplen = snaplen;
    w->batch_size = batch_size;
    if (!w->cur.slots && (table_init(&w->cur, 4096) < 0 || table_init(&w->prev, 4096) < 0))
        return -1;
    if (!w->ready && !(w->ready = PyList_New(0)))
        return -1;
    return 0;
}

static void Walker_dealloc(Walker *w) {
    table_free(&w->cur);
    table_free(&w->prev);
    PyMem_Free(w->buf);
    Py_XDECREF(w->ready);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static inline uint32_t rd32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint16_t rd16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* The hash tables are far bigger than the caches: a lookup is a cache miss. A second cursor runs AHEAD frames in
 * front of the walk, hashes each plain frame straight from the ring (the bytes the record will hold) and prefetches
 * its slots, so the misses overlap. It only reads; the walk checks every header again, and a VLAN frame (whose
 * record differs from the ring's bytes) is hashed by commit() as usual. */
#define AHEAD 16

typedef struct {
    size_t off;
    uint32_t i;                      /* the frame the cursor is at */
    int more;
    uint64_t hash[AHEAD];
    int valid[AHEAD];
} Ahead;

static void look_ahead(const Walker *w, Ahead *a, const unsigned char *blk, size_t end, uint32_t num) {
    uint32_t slot = a->i % AHEAD;
    if (!a->more || a->i >= num || a->off + PKT_HDR > end) {
        a->more = 0;
        a->valid[slot] = 0;
        a->i++;
        return;
    }
    const unsigned char *h = blk + a->off;
    uint32_t nxt = rd32(h), cap = rd32(h + 12), wire = rd32(h + 16), status = rd32(h + 20);
    size_t start = a->off + rd16(h + 24);
    a->valid[slot] = 0;
    if (start + cap > end || cap > wire) {
        a->more = 0;
    } else if (!(status & TP_STATUS_VLAN_VALID)) {
        size_t len = cap < (size_t)w->snaplen ? cap : (size_t)w->snaplen;
        uint64_t hv = XXH3_64bits_withSeed(blk + start, len, (XXH64_hash_t)wire);
        a->hash[slot] = hv;
        a->valid[slot] = 1;
        __builtin_prefetch(&w->cur.slots[hv & w->cur.mask], 1);
        __builtin_prefetch(&w->prev.slots[hv & w->prev.mask], 0);
    }
    if (!nxt)
        a->more = 0;
    a->off += nxt;
    a->i++;
}

/* walk(buf, base, block_size) -> (captured, duplicates, bad_headers, truncated): one ring block. */
static PyObject *Walker_walk(Walker *w, PyObject *args) {
    Py_buffer view;
    Py_ssize_t base, bsize;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &base, &bsize))
        return NULL;
    long long captured = 0, dups = 0, bad = 0, trunc = 0;
    if (!w->ready) {
        PyBuffer_Release(&view);
        return not_ready();
    }
    if (base < 0 || bsize < 20 || base > view.len || bsize > view.len - base) {   /* no overflow: both < len */
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "block outside the buffer");
        return NULL;
    }
    const unsigned char *blk = (const unsigned char *)view.buf + base;
    uint32_t num = rd32(blk + 12);
    size_t off = rd32(blk + 16), end = (size_t)bsize;
    size_t snaplen = (size_t)w->snaplen;
    Ahead ahead = {.off = off, .i = 0, .more = w->window > 0};
    for (uint32_t k = 0; k < AHEAD; k++)
        look_ahead(w, &ahead, blk, end, num);
    for (uint32_t i = 0; i < num; i++) {
        if (off + PKT_HDR > end) {
            bad += num - i;
            break;
        }
        const unsigned char *h = blk + off;
        uint32_t nxt = rd32(h), sec = rd32(h + 4), nsec = rd32(h + 8), cap = rd32(h + 12), wire = rd32(h + 16);
        uint32_t status = rd32(h + 20);
        size_t start = off + rd16(h + 24);
        if (start + cap > end || cap > wire ||
            ((status & TP_STATUS_VLAN_VALID) && wire > UINT32_MAX - 4)) {   /* the tag must fit the wire length */
            bad += num - i;
            break;
        }
        int64_t ts = (int64_t)sec * 1000000000LL + nsec;
        const unsigned char *src = blk + start;
        size_t len;
        if (reserve(w, REC_HDR + (size_t)cap + 4) < 0)
            goto fail;
        unsigned char *dst = w->buf + w->len + REC_HDR;
        if (status & TP_STATUS_VLAN_VALID) {     /* put back the 802.1Q tag the veth/NIC stripped */
            uint16_t tci = (uint16_t)rd32(h + 32);
            uint16_t tpid = (status & TP_STATUS_VLAN_TPID_VALID) ? rd16(h + 36) : 0x8100;
            size_t head = cap < 12 ? cap : 12;
            memcpy(dst, src, head);
            dst[head] = tpid >> 8;
            dst[head + 1] = tpid & 0xff;
            dst[head + 2] = tci >> 8;
            dst[head + 3] = tci & 0xff;
            memcpy(dst + head + 4, src + head, cap - head);
            len = (size_t)cap + 4;
            wire += 4;
        } else {
            memcpy(dst, src, cap);
            len = cap;
        }
        if (len > snaplen)
            len = snaplen;
        const uint64_t *hashed = NULL;
        if (ahead.i == i + AHEAD && ahead.valid[i % AHEAD])
            hashed = &ahead.hash[i % AHEAD];
        if (tally(w, ts, wire, len, hashed, &captured, &dups, &trunc) < 0)
            goto fail;
        look_ahead(w, &ahead, blk, end, num);       /* frame i + AHEAD, into the slot frame i just left */
        if (!nxt)
            break;
        off += nxt;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(LLLL)", captured, dups, bad, trunc);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* add(frames) -> (captured, duplicates, truncated): frames (ts_ns, wire_len, data) from elsewhere (a pcap). */
static PyObject *Walker_add(Walker *w, PyObject *frames) {
    if (!w->ready)
        return not_ready();
    PyObject *seq = PySequence_Fast(frames, "frames must be a sequence");
    if (!seq)
        return NULL;
    long long captured = 0, dups = 0, trunc = 0;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < count; i++) {
        long long ts;
        unsigned int wire;
        Py_buffer data;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LIy*", &ts, &wire, &data))
            goto fail;
        if (reserve(w, REC_HDR + (size_t)data.len) < 0) {
            PyBuffer_Release(&data);
            goto fail;
        }
        memcpy(w->buf + w->len + REC_HDR, data.buf, data.len);
        size_t len = (size_t)data.len;
        PyBuffer_Release(&data);
        if (tally(w, ts, wire, len, NULL, &captured, &dups, &trunc) < 0)
            goto fail;
    }
    Py_DECREF(seq);
    return Py_BuildValue("(LLL)", captured, dups, trunc);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* ready() -> the completed batches since the last call. */
static PyObject *Walker_ready(Walker *w, PyObject *Py_UNUSED(ignored)) {
    if (!w->ready)
        return not_ready();
    PyObject *out = w->ready, *fresh = PyList_New(0);
    if (!fresh)
        return NULL;
    w->ready = fresh;
    return out;
}

/* take() -> the completed batches, then the open one if any, as (bytes, n, wire_bytes, first_ns, last_ns). */
static PyObject *Walker_take(Walker *w, PyObject *Py_UNUSED(ignored)) {
    if (!w->ready)
        return not_ready();
    if (w->n && finish_batch(w) < 0)
        return NULL;
    return Walker_ready(w, NULL);
}

static PyObject *Walker_pending(Walker *w, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(w->n);
}

static Py_ssize_t Walker_len(Walker *w) {
    return (Py_ssize_t)(w->cur.used + w->prev.used);
}

static PyMethodDef Walker_methods[] = {
    {"walk", (PyCFunction)Walker_walk, METH_VARARGS, "walk(buf, base, block_size): one TPACKET_V3 block"},
    {"add", (PyCFunction)Walker_add, METH_O, "add(frames): (ts_ns, wire_len, data) tuples"},
    {"ready", (PyCFunction)Walker_ready, METH_NOARGS, "the completed batches since the last call"},
    {"take", (PyCFunction)Walker_take, METH_NOARGS, "the completed batches and the open one"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"pending", (getter)Walker_pending, NULL, "frames in the open batch", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Walker_seq = {.sq_length = (lenfunc)Walker_len};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "snooper._fastcap.Walker",
    .tp_doc = "Walker(window_ns, snaplen, batch_size): ring blocks -> dedupe -> packed batches",
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_methods = Walker_methods,
    .tp_getset = Walker_getset,
    .tp_as_sequence = &Walker_seq,
};

static struct PyModuleDef fastcap_module = {
    PyModuleDef_HEAD_INIT, "snooper._fastcap", "The capture hot path (see snooper/engine.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastcap(void) {
    if (PyType_Ready(&WalkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastcap_module);
    if (!m)
        return NULL;
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
