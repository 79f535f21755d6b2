/* The fast engine's read of a step in C: join the step's packed batches and gather their records in one pass.
 *
 * It does what analyser/gather.py's pure path does (its walk of each blob's <qII record headers, the format of
 * appliance/framebatch.py, then a numpy gather of each record's header and the first HEAD bytes of its frame),
 * and tests/test_gather.py holds the two to byte-identical results.  No numpy C API: every array is returned as
 * a bytes object of native int64 (or, for the heads, n * HEAD bytes) that Python wraps with np.frombuffer.
 *
 * gather(blobs) -> (buf, offs, owner, ts, wl, cap, head, errors, fields)
 *   buf    the blobs joined, then -len % 8 + PAD zero bytes (a frame's HEAD bytes stay inside it)
 *   offs   each record's offset in buf; owner: the index of its blob
 *   ts, wl, cap  its header's fields; head: bytes 16 .. 16 + HEAD of the record, read from buf as they are:
 *          past the end of a shorter frame they are the next record's bytes or the pad (what the numpy
 *          gather reads; the engine reads no byte of a frame past its captured length)
 *   errors per blob, the text of its first damaged record or None (the records before it count)
 *   fields what analyser/fast.py's _read_shape and _endpoints compute from cap and head with many numpy passes,
 *          per frame in the same pass (tests/test_gather.py holds them equal): bulk, v6, udp, synrst (bool), l4, end,
 *          doff, tflags (int64), then sh, sl, dh, dl, sx, dx, sport, dport, hs, hd (uint64), then what
 *          fast.py reads of some frames: the TCP seq, ack, window (int64) and the source MAC (uint64)
 * Sizes are checked in 64-bit arithmetic that cannot overflow with a 32-bit size_t.
 *
 * group(keys) -> (rep, inv): the grouping fast.py's _read_groups asks numpy.unique for, with a hash table.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define REC_HDR 16
#define HEAD 72                      /* analyser/gather.py HEAD */
#define PAD 104                      /* analyser/gather.py PAD */

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--)
        v = (v << 8) | p[k];
    return v;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t be16(const unsigned char *p) {
    return (uint64_t)p[0] << 8 | p[1];
}

static uint64_t be32(const unsigned char *p) {
    return be16(p) << 16 | be16(p + 2);
}

static uint64_t be64(const unsigned char *p) {
    return be32(p) << 32 | be32(p + 4);
}

/* splitmix64's finaliser (analyser/fast.py _mix). */
static uint64_t mix(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

#define N_FIELDS 22
#define N_BOOL 4                     /* the first N_BOOL fields are one byte each, the rest eight */
enum { BULK, V6, UDP, SYNRST, L4, END, DOFF, TFLAGS, SH, SL, DH, DL, SX, DX, SPORT, DPORT, HS, HD, SEQ, ACK, WIN, SMAC };

/* The fields of frame j from its head h and captured length: the formulas of fast.py's _read_shape (Ethernet
 * + IPv4 without options or IPv6, then TCP without SYN or RST, or UDP; synrst: TCP of that shape with SYN or
 * RST) and _endpoints (both ends as 64-bit lanes and their hashes), evaluated for every frame as numpy does
 * (both branches read, one kept). */
static void fields(const unsigned char *h, int64_t cap, size_t j, char **f) {
    uint64_t etype = be16(h + 12), b14 = h[14];
    int64_t tot4 = (int64_t)be16(h + 16);
    int ip4 = etype == 0x0800 && b14 == 0x45 && (be16(h + 20) & 0x1FFF) == 0 && tot4 >= 20;
    int ip6 = etype == 0x86DD && (b14 >> 4) == 6;
    int v4 = ip4 && (h[23] == 6 || h[23] == 17), v6 = ip6 && (h[20] == 6 || h[20] == 17);
    int udp = (v4 && h[23] == 17) || (v6 && h[20] == 17);
    const unsigned char *t = h + (v6 ? 54 : 34);
    int64_t l4 = v6 ? 54 : 34;
    int64_t end = v6 ? 54 + (int64_t)be16(h + 18) : 14 + tot4;
    if (cap < end)
        end = cap;
    int64_t doff = udp ? 8 : (t[12] >> 4) * 4, tflags = udp ? 0 : t[13];
    int odd = (tflags & 0x06) != 0;  /* SYN or RST (0 for UDP) */
    int whole = cap > 0 && (v4 || v6) && (udp ? end - l4 >= 8 : end - l4 >= 20 && doff >= 20 && l4 + doff <= end);
    int bulk = whole && !odd, synrst = whole && odd;
    uint64_t sh = v6 ? be64(h + 22) : be32(h + 26) << 32, sl = v6 ? be64(h + 30) : 0;
    uint64_t dh = v6 ? be64(h + 38) : be32(h + 30) << 32, dl = v6 ? be64(h + 46) : 0;
    uint64_t fam = (uint64_t)(v6 ? 6 : 4) << 16 | (uint64_t)(udp ? 17 : 6) << 24;
    uint64_t sport = be16(t), dport = be16(t + 2);
    uint64_t sx = sport | fam, dx = dport | fam;
    ((unsigned char *)f[BULK])[j] = (unsigned char)bulk;
    ((unsigned char *)f[V6])[j] = (unsigned char)v6;
    ((unsigned char *)f[UDP])[j] = (unsigned char)udp;
    ((unsigned char *)f[SYNRST])[j] = (unsigned char)synrst;
    int64_t i64[] = {l4, end, doff, tflags};
    for (int k = 0; k < 4; k++)
        ((int64_t *)f[L4 + k])[j] = i64[k];
    uint64_t u64[] = {sh, sl, dh, dl, sx, dx, sport, dport, mix(mix(mix(sh) ^ sl) ^ sx), mix(mix(mix(dh) ^ dl) ^ dx),
                      be32(t + 4), be32(t + 8), be16(t + 14), be16(h + 6) << 32 | be32(h + 8)};
    for (int k = 0; k < 14; k++)
        ((uint64_t *)f[SH + k])[j] = u64[k];
}

/* A growing array of int64 pairs (offset, owner). */
typedef struct {
    int64_t *v;
    size_t n, cap;                   /* in pairs */
} Pairs;

static int pairs_push(Pairs *a, int64_t off, int64_t owner) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 4096;
        if (cap > PY_SSIZE_T_MAX / (2 * sizeof(int64_t))) {
            PyErr_NoMemory();
            return -1;
        }
        int64_t *v = PyMem_Realloc(a->v, cap * 2 * sizeof(int64_t));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[2 * a->n] = off;
    a->v[2 * a->n + 1] = owner;
    a->n++;
    return 0;
}

/* Walk the records of one blob (now at buf + base, len bytes): append (offset, owner) of each whole one; the
 * error text of the first damaged one (a new reference), or None; NULL with an exception set. */
static PyObject *walk(const unsigned char *buf, uint64_t base, uint64_t len, int64_t owner, Pairs *out) {
    uint64_t off = 0;
    while (off < len) {
        if (len - off < REC_HDR)
            return PyUnicode_FromFormat("truncated record header at byte %llu", (unsigned long long)off);
        uint64_t size = le32(buf + base + off + 12);
        if (size > len - off - REC_HDR)
            return PyUnicode_FromFormat("record at byte %llu claims %llu bytes, %llu left", (unsigned long long)off,
                                        (unsigned long long)size, (unsigned long long)(len - off - REC_HDR));
        if (pairs_push(out, (int64_t)(base + off), owner) < 0)
            return NULL;
        off += REC_HDR + size;
    }
    Py_RETURN_NONE;
}

static PyObject *new_bytes(size_t size, char **data) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (b != NULL)
        *data = PyBytes_AS_STRING(b);
    return b;
}

static PyObject *gather(PyObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "gather: expected a list of bytes-like blobs");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *views = PyMem_Calloc(nb ? (size_t)nb : 1, sizeof(Py_buffer));
    PyObject *errors = PyList_New(nb), *joined = NULL, *result = NULL;
    PyObject *arrays[6] = {NULL, NULL, NULL, NULL, NULL, NULL};    /* offs, owner, ts, wl, cap, head */
    PyObject *fieldv = NULL;                                        /* a tuple of N_FIELDS bytes objects */
    Pairs recs = {NULL, 0, 0};
    Py_ssize_t got = 0;              /* views taken */
    if (views == NULL || errors == NULL) {
        if (views == NULL)
            PyErr_NoMemory();
        goto done;
    }
    uint64_t total = 0;
    while (got < nb) {
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_SIMPLE) < 0)
            goto done;
        total += (uint64_t)views[got++].len;   /* both terms <= PY_SSIZE_T_MAX: no wrap */
        if (total > (uint64_t)PY_SSIZE_T_MAX - 8 - PAD) {
            PyErr_SetString(PyExc_OverflowError, "gather: the blobs do not fit in one buffer");
            goto done;
        }
    }
    uint64_t size = total + (-total & 7) + PAD;
    char *buf;
    joined = new_bytes((size_t)size, &buf);
    if (joined == NULL)
        goto done;
    uint64_t base = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        uint64_t len = (uint64_t)views[i].len;
        if (len)
            memcpy(buf + base, views[i].buf, (size_t)len);
        PyObject *err = walk((const unsigned char *)buf, base, len, i, &recs);
        if (err == NULL)
            goto done;
        PyList_SET_ITEM(errors, i, err);
        base += len;
    }
    memset(buf + total, 0, (size_t)(size - total));
    size_t n = recs.n;
    if (n > PY_SSIZE_T_MAX / HEAD) {
        PyErr_NoMemory();
        goto done;
    }
    char *data[6];
    for (int k = 0; k < 6; k++) {
        arrays[k] = new_bytes(k == 5 ? n * HEAD : n * sizeof(int64_t), &data[k]);
        if (arrays[k] == NULL)
            goto done;
    }
    char *f[N_FIELDS];
    fieldv = PyTuple_New(N_FIELDS);
    if (fieldv == NULL)
        goto done;
    for (int k = 0; k < N_FIELDS; k++) {
        PyObject *b = new_bytes(k < N_BOOL ? n : n * sizeof(int64_t), &f[k]);
        if (b == NULL)
            goto done;
        PyTuple_SET_ITEM(fieldv, k, b);
    }
    int64_t *offs = (int64_t *)data[0], *owner = (int64_t *)data[1], *ts = (int64_t *)data[2];
    int64_t *wl = (int64_t *)data[3], *cap = (int64_t *)data[4];
    unsigned char *head = (unsigned char *)data[5];
    const unsigned char *u = (const unsigned char *)buf;
    for (size_t j = 0; j < n; j++) {
        uint64_t off = (uint64_t)recs.v[2 * j];   /* off + REC_HDR <= total, so off + REC_HDR + HEAD < size */
        offs[j] = (int64_t)off;
        owner[j] = recs.v[2 * j + 1];
        ts[j] = (int64_t)le64(u + off);
        wl[j] = le32(u + off + 8);
        cap[j] = le32(u + off + 12);
        memcpy(head + j * HEAD, u + off + REC_HDR, HEAD);
        fields(head + j * HEAD, cap[j], j, f);
    }
    result = Py_BuildValue("(OOOOOOOOO)", joined, arrays[0], arrays[1], arrays[2], arrays[3], arrays[4], arrays[5],
                           errors, fieldv);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(recs.v);
    for (int k = 0; k < 6; k++)
        Py_XDECREF(arrays[k]);
    Py_XDECREF(joined);
    Py_XDECREF(fieldv);
    Py_XDECREF(errors);
    Py_DECREF(seq);
    return result;
}

/* A key and the first position it was seen at, for the sort of the distinct keys. */
typedef struct {
    uint64_t key;
    int64_t first, id;
} Seen;

static int by_key(const void *a, const void *b) {
    uint64_t x = ((const Seen *)a)->key, y = ((const Seen *)b)->key;
    return x < y ? -1 : x > y;
}

/* group(keys) -> (rep, inv): numpy.unique(keys, return_index=True, return_inverse=True) of a uint64 array, in
 * O(n) with a hash table (then a sort of the distinct keys only): rep[g] the first position of the g-th smallest
 * distinct key, inv[i] the group of keys[i]; both native int64 bytes. */
static PyObject *group(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL, *rep_b = NULL, *inv_b = NULL;
    int64_t *slot = NULL, *prov = NULL, *rank = NULL;
    Seen *seen = NULL;
    if (view.len % 8) {
        PyErr_SetString(PyExc_ValueError, "group: expected uint64 keys");
        goto done;
    }
    size_t n = (size_t)view.len / 8, cap = 16;
    while (cap < 2 * n)
        cap *= 2;                    /* n <= PY_SSIZE_T_MAX / 8: no overflow */
    const unsigned char *raw = view.buf;
    slot = PyMem_Malloc(cap * sizeof(int64_t));
    prov = PyMem_Malloc((n ? n : 1) * sizeof(int64_t));
    seen = PyMem_Malloc((n ? n : 1) * sizeof(Seen));
    if (slot == NULL || prov == NULL || seen == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t k = 0; k < cap; k++)
        slot[k] = -1;
    size_t g = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t key;
        memcpy(&key, raw + 8 * i, 8);
        size_t h = (size_t)(mix(key) & (cap - 1));
        while (slot[h] >= 0 && seen[slot[h]].key != key)
            h = (h + 1) & (cap - 1);
        if (slot[h] < 0) {
            seen[g].key = key;
            seen[g].first = (int64_t)i;
            seen[g].id = (int64_t)g;
            slot[h] = (int64_t)g++;
        }
        prov[i] = slot[h];
    }
    qsort(seen, g, sizeof(Seen), by_key);
    rank = PyMem_Malloc((g ? g : 1) * sizeof(int64_t));
    char *rep_d, *inv_d;
    rep_b = new_bytes(g * sizeof(int64_t), &rep_d);
    inv_b = new_bytes(n * sizeof(int64_t), &inv_d);
    if (rank == NULL || rep_b == NULL || inv_b == NULL) {
        if (rank == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (size_t r = 0; r < g; r++) {
        rank[seen[r].id] = (int64_t)r;
        ((int64_t *)rep_d)[r] = seen[r].first;
    }
    for (size_t i = 0; i < n; i++)
        ((int64_t *)inv_d)[i] = rank[prov[i]];
    result = PyTuple_Pack(2, rep_b, inv_b);
done:
    PyBuffer_Release(&view);
    PyMem_Free(slot);
    PyMem_Free(prov);
    PyMem_Free(seen);
    PyMem_Free(rank);
    Py_XDECREF(rep_b);
    Py_XDECREF(inv_b);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_O,
     "gather(blobs) -> (buf, offs, owner, ts, wl, cap, head, errors, fields): a step's records (analyser/gather.py)"},
    {"group", group, METH_O, "group(uint64 keys) -> (rep, inv): numpy.unique's return_index and return_inverse"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastread", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastread(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "HEAD", HEAD) < 0 || PyModule_AddIntConstant(m, "PAD", PAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
