/* _tcp_run: tcp_run.py's segment and gather in C: a guest frame's segment numbers and flow,
 * and a run of one flow's in-order guest segments.
 *
 * Design: `segment` makes of one frame what tcp_run.segment_python does, the reference: the
 * same checks in the same order, the same kinds, the flow found by the same key (a tuple
 * of the same objects: int 6, the source bytes, the port, ...), so the dict lookup and its
 * result are Python's own. Frames of kinds other than SEG_TCP return one tuple built at
 * import, nothing allocated.
 *
 * `gather` walks as tcp_run.gather_python, the reference, which says what a segment must
 * be to be taken (the module docstring there). Here the walk reads the read
 * buffer in place through the buffer protocol and appends each payload to the run's list
 * as a slice of the caller's memoryview, so the views keep the buffer exported (it cannot
 * be resized or closed under them) exactly as the Python path's slices do. Every offset is
 * checked against the buffer before it is read: a frame whose words claim more than the
 * buffer holds ends the run, the `first` frame outside the buffer is a ValueError.
 *
 * Why it exists: per segment the Python walk costs ~1.5 us of interpreter time; this one
 * costs the slice; the Python parse of one frame ~4k instructions, this one the key and
 * the result. setup.sh builds it; without it (or with PASSTD_NATIVE=0) tcp_run.py runs
 * segment_python and gather_python, tested the same.
 *
 * Deliberately not done: anything that changes a flow's state (tcp.py decides; the caller
 * accounts what was taken), frames of other flows, checksum verification.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_FRAME 14
#define MAX_FRAME 65535
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

static uint32_t be16(const unsigned char *p)
{
	return (uint32_t)p[0] << 8 | p[1];
}

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

#define SEG_OTHER 0
#define SEG_BAD4 1
#define SEG_BAD6 2
#define SEG_TCP 3

struct seg {
	const unsigned char *addrs;  /* source then destination address, then the ports */
	Py_ssize_t addr_len;  /* 4 (IPv4) or 16 (IPv6): one address */
	Py_ssize_t tcp;  /* TCP header offset in the buffer */
	Py_ssize_t data;  /* payload offset */
	Py_ssize_t end;  /* payload end */
};

/* What the frame at off (length >= MIN_FRAME bytes, all inside the buffer at base) is:
 * tcp_run._headers' one check, for segment and gather alike. For SEG_TCP it fills *s;
 * the ports follow the addresses in both families, so 2 * addr_len + 4 bytes from
 * s->addrs name the flow. */
static int headers(const unsigned char *base, Py_ssize_t off, Py_ssize_t length,
		   struct seg *s)
{
	const unsigned char *f = base + off;
	uint32_t ethertype = be16(f + 12), thl;

	if (ethertype == 0x0800 && length >= 54 && f[14] == 0x45 && f[23] == 6) {
		uint32_t total = be16(f + 16);

		thl = (uint32_t)(f[46] >> 4) << 2;
		if (be16(f + 20) & 0x3fff || (Py_ssize_t)total + 14 > length || thl < 20 ||
		    thl + 20 > total)
			return SEG_BAD4;
		s->addrs = f + 26;
		s->addr_len = 4;
		s->tcp = off + 34;
		s->end = off + 14 + total;
	} else if (ethertype == 0x86dd && length >= 74 && f[20] == 6) {
		uint32_t plen = be16(f + 18);

		thl = (uint32_t)(f[66] >> 4) << 2;
		if (f[14] >> 4 != 6 || (Py_ssize_t)plen + 54 > length || thl < 20 || thl > plen)
			return SEG_BAD6;
		s->addrs = f + 22;
		s->addr_len = 16;
		s->tcp = off + 54;
		s->end = off + 54 + plen;
	} else {
		return SEG_OTHER;
	}
	s->data = s->tcp + thl;
	return SEG_TCP;
}

/* An offset: out of Py_ssize_t's range saturates, so that the bounds checks refuse it with
 * the same ValueError as gather_python's comparisons (never an OverflowError). */
static int offset(PyObject *obj, Py_ssize_t *out)
{
	int overflow;
	long v = PyLong_AsLongAndOverflow(obj, &overflow);

	if (v == -1 && PyErr_Occurred())
		return -1;
	*out = overflow > 0 ? PY_SSIZE_T_MAX : overflow < 0 ? PY_SSIZE_T_MIN : (Py_ssize_t)v;
	return 0;
}

/* A header field: an unsigned number up to max, else ValueError (as gather_python). */
static int field(PyObject *obj, unsigned long max, unsigned long *out)
{
	int overflow;
	long v = PyLong_AsLongAndOverflow(obj, &overflow);

	if (v == -1 && PyErr_Occurred())
		return -1;
	if (overflow || v < 0 || (unsigned long)v > max) {
		PyErr_SetString(PyExc_ValueError,
				"seq and ack must be 32-bit, window 16-bit unsigned numbers");
		return -1;
	}
	*out = (unsigned long)v;
	return 0;
}

static PyObject *kind_only[SEG_TCP];  /* (kind, None, 0, 0, 0, 0, 0, 0), built at import */

/* The key of the segment looked up last: the frames of a read mostly belong to the flow of
 * the frame before, and for them the same tuple serves again, its bytes' hashes cached in
 * it (the lookup itself is made every time: the flow may have gone, or come). */
static PyObject *last_key;
static unsigned char last_raw[36];  /* its addresses (2 x 4 or 2 x 16) and ports */
static size_t last_raw_len;

/* A new reference to the FlowKey of a segment: (6, source, source port, destination,
 * destination port), from its addresses and ports (src: two addresses of len bytes each,
 * then the two ports). */
static PyObject *flow_key(const unsigned char *src, Py_ssize_t len)
{
	size_t raw_len = 2 * (size_t)len + 4;
	const unsigned char *ports = src + 2 * len;
	PyObject *key;

	if (last_key != NULL && raw_len == last_raw_len && memcmp(last_raw, src, raw_len) == 0)
		return Py_NewRef(last_key);
	key = PyTuple_New(5);
	if (key == NULL)
		return NULL;
	PyTuple_SET_ITEM(key, 0, PyLong_FromLong(6));
	PyTuple_SET_ITEM(key, 1, PyBytes_FromStringAndSize((const char *)src, len));
	PyTuple_SET_ITEM(key, 2, PyLong_FromLong((long)be16(ports)));
	PyTuple_SET_ITEM(key, 3, PyBytes_FromStringAndSize((const char *)src + len, len));
	PyTuple_SET_ITEM(key, 4, PyLong_FromLong((long)be16(ports + 2)));
	if (PyErr_Occurred()) {  /* an item could not be made (its slot is NULL) */
		Py_DECREF(key);
		return NULL;
	}
	memcpy(last_raw, src, raw_len);
	last_raw_len = raw_len;
	Py_XSETREF(last_key, Py_NewRef(key));
	return key;
}

/* (SEG_TCP, flow, flags, seq, ack, window, data, end), as segment_python's tuple. */
static PyObject *segment_tuple(PyObject *flow, const unsigned char *tcp, Py_ssize_t data,
			       Py_ssize_t end)
{
	PyObject *result = PyTuple_New(8);

	if (result == NULL)
		return NULL;
	PyTuple_SET_ITEM(result, 0, PyLong_FromLong(SEG_TCP));
	PyTuple_SET_ITEM(result, 1, Py_NewRef(flow));
	PyTuple_SET_ITEM(result, 2, PyLong_FromLong(tcp[13]));
	PyTuple_SET_ITEM(result, 3, PyLong_FromUnsignedLong(be32(tcp + 4)));
	PyTuple_SET_ITEM(result, 4, PyLong_FromUnsignedLong(be32(tcp + 8)));
	PyTuple_SET_ITEM(result, 5, PyLong_FromLong((long)be16(tcp + 14)));
	PyTuple_SET_ITEM(result, 6, PyLong_FromSsize_t(data));
	PyTuple_SET_ITEM(result, 7, PyLong_FromSsize_t(end));
	if (PyErr_Occurred()) {
		Py_DECREF(result);
		return NULL;
	}
	return result;
}

PyDoc_STRVAR(segment_doc,
	     "segment(mem, off, length, flows, /)\n"
	     "    -> (kind, flow, flags, seq, ack, window, data, end)\n\n"
	     "tcp_run.segment_python in C: the same arguments, results and exceptions.");

static PyObject *run_segment(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf;
	Py_ssize_t off, length;
	PyObject *mem, *flows, *key, *flow, *result = NULL;
	const unsigned char *base;
	struct seg s;
	int kind;

	(void)self;
	if (nargs != 4) {
		PyErr_Format(PyExc_TypeError, "segment() takes 4 arguments (%zd given)", nargs);
		return NULL;
	}
	mem = args[0];
	flows = args[3];
	if (!PyMemoryView_Check(mem) || !PyDict_Check(flows)) {
		PyErr_SetString(PyExc_TypeError, "segment() takes a memoryview and a dict");
		return NULL;
	}
	if (offset(args[1], &off) < 0 || offset(args[2], &length) < 0)
		return NULL;
	if (PyObject_GetBuffer(mem, &buf, PyBUF_SIMPLE) < 0)
		return NULL;
	if (off < 0 || length < MIN_FRAME || length > buf.len - off) {
		PyErr_SetString(PyExc_ValueError,
				"the frame must lie in the buffer and hold an Ethernet header");
		goto done;
	}
	base = buf.buf;
	kind = headers(base, off, length, &s);
	if (kind != SEG_TCP) {
		result = Py_NewRef(kind_only[kind]);
		goto done;
	}
	key = flow_key(s.addrs, s.addr_len);
	if (key == NULL)
		goto done;
	flow = PyDict_GetItemWithError(flows, key);  /* borrowed */
	Py_DECREF(key);
	if (flow == NULL) {
		if (PyErr_Occurred())
			goto done;
		flow = Py_None;
	}
	result = segment_tuple(flow, base + s.tcp, s.data, s.end);
done:
	PyBuffer_Release(&buf);
	return result;
}

PyDoc_STRVAR(gather_doc,
	     "gather(mem, first, pos, end, seq, ack, window, views, /)\n"
	     "    -> (pos, frames, nbytes, last)\n\n"
	     "tcp_run.gather_python in C: the same arguments, results and exceptions.");

static PyObject *run_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf;
	Py_ssize_t first, pos, end, count = 0, nbytes = 0, last = -1;
	unsigned long seq, ack, window;
	PyObject *mem, *views, *result = NULL;
	const unsigned char *base;
	struct seg run;

	(void)self;
	if (nargs != 8) {
		PyErr_Format(PyExc_TypeError, "gather() takes 8 arguments (%zd given)", nargs);
		return NULL;
	}
	mem = args[0];
	views = args[7];
	if (!PyMemoryView_Check(mem) || !PyList_Check(views)) {
		PyErr_SetString(PyExc_TypeError, "gather() takes a memoryview and a list");
		return NULL;
	}
	if (field(args[4], 0xffffffffUL, &seq) < 0 || field(args[5], 0xffffffffUL, &ack) < 0 ||
	    field(args[6], 0xffffUL, &window) < 0 || offset(args[1], &first) < 0 ||
	    offset(args[2], &pos) < 0 || offset(args[3], &end) < 0)
		return NULL;
	if (PyObject_GetBuffer(mem, &buf, PyBUF_SIMPLE) < 0)
		return NULL;
	base = buf.buf;
	if (pos < 0 || end < pos || end > buf.len) {
		PyErr_SetString(PyExc_ValueError, "pos and end must lie in the buffer, pos <= end");
		goto done;
	}
	if (first < 0 || first > buf.len - MIN_FRAME ||
	    headers(base, first, buf.len - first, &run) != SEG_TCP) {
		PyErr_SetString(PyExc_ValueError,
				"the run's first frame is not a TCP segment the fast path takes");
		goto done;
	}
	while (end - pos >= 4) {
		Py_ssize_t length = be32(base + pos), off = pos + 4, size;
		struct seg s;
		const unsigned char *tcp;
		PyObject *view;

		if (length < MIN_FRAME || length > MAX_FRAME || end - pos - 4 < length)
			break;
		if (headers(base, off, length, &s) != SEG_TCP || s.addr_len != run.addr_len ||
		    memcmp(s.addrs, run.addrs, 2 * (size_t)s.addr_len + 4) != 0)
			break;
		tcp = base + s.tcp;
		if ((tcp[13] & (TH_SYN | TH_RST | TH_FIN | TH_ACK)) != TH_ACK ||
		    be32(tcp + 4) != seq || be32(tcp + 8) != ack || be16(tcp + 14) != window ||
		    s.end == s.data)
			break;
		view = PySequence_GetSlice(mem, s.data, s.end);
		if (view == NULL)
			goto done;
		if (PyList_Append(views, view) < 0) {
			Py_DECREF(view);
			goto done;
		}
		Py_DECREF(view);
		size = s.end - s.data;
		seq = (seq + (unsigned long)size) & 0xffffffffUL;
		nbytes += size;
		count++;
		last = off;
		pos = off + length;
	}
	result = Py_BuildValue("(nnnn)", pos, count, nbytes, last);
done:
	PyBuffer_Release(&buf);
	return result;
}

static PyMethodDef run_methods[] = {
	{"segment", (PyCFunction)(void (*)(void))run_segment, METH_FASTCALL, segment_doc},
	{"gather", (PyCFunction)(void (*)(void))run_gather, METH_FASTCALL, gather_doc},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef run_module = {
	PyModuleDef_HEAD_INIT, "_tcp_run",
	"The guest frames' fast path in C (see passtd/engine/tcp_run.py).", -1,
	run_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tcp_run(void)
{
	int kind;

	for (kind = SEG_OTHER; kind < SEG_TCP; kind++) {
		kind_only[kind] = Py_BuildValue("(iOiiiiii)", kind, Py_None, 0, 0, 0, 0, 0, 0);
		if (kind_only[kind] == NULL)
			return NULL;
	}
	return PyModule_Create(&run_module);
}
