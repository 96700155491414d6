/* _tcp_buf: tcp_buf.py's frame writers in C: the headers of a batch of host->guest frames
 * (write_headers) and a control segment's frame (control_frame).
 *
 * Design: the same writes as tcp_buf.write_headers_python and control_frame_python, which
 * are the reference and say what each frame holds (the layout comments in tcp_buf.py).
 * write_headers: the payloads are already in the slots (peeked there by tcp_peek.py); it
 * fills, slot by slot, the length word, Ethernet, IPv4 or IPv6 and TCP headers, summing
 * each payload (_sum.h) for its checksum, in one call over the buffer protocol.
 * control_frame returns a new bytes object: length word, headers, options, zeroes up to
 * the Ethernet minimum. The flow's bytes (MACs, addresses, ports) and the addresses'
 * partial sum come from the caller, built once per flow (tcp_buf.FlowHeader).
 *
 * Why it exists: the Python loop costs a pack of 12 values and a checksum call per frame,
 * about 5,700 instructions for a request/response reply of one frame, all of it between
 * the instance's wakeup and its send to qemu (docs/BENCHMARK.md, "Before the send").
 * A connection's three control segments (SYN-ACK, FIN, ACK: crr) cost about 3,900
 * instructions each in Python, the SYN-ACK's before the send that the guest's connect()
 * waits for. setup.sh builds it; without it (or with PASSTD_NATIVE=0) tcp_buf.py runs the
 * Python twins, tested the same.
 *
 * Deliberately not done: any decision (sequence numbers, window, flags and options come
 * from the caller, who has them from tcp.py), checksum offload.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_sum.h"

#define ETH_HLEN 14
#define ETH_MIN_FRAME 60 /* without the FCS */
#define HEAD4 58 /* length word, Ethernet, IPv4, TCP */
#define HEAD6 78 /* length word, Ethernet, IPv6, TCP */
#define START4 16 /* MACs, ethertype, IPv4 version and TOS */
#define START6 18 /* MACs, ethertype, IPv6 version and flow label */
#define FLOW4 12 /* addresses, ports */
#define FLOW6 38 /* next header, hop limit, addresses, ports */
#define TH_PSH 0x08
#define TH_ACK 0x10
#define DOFF (5 << 4) /* 20 bytes, no options */
#define IPPROTO_TCP_ 6
/* the IPv4 header's constant words: version/IHL/TOS, DF, TTL 255/protocol TCP */
#define IP4_FIXED_SUM (0x4500 + 0x4000 + (255 << 8 | IPPROTO_TCP_))

static const unsigned char ip4_middle[6] = {0, 0, 0x40, 0, 255, IPPROTO_TCP_};

static void put16(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static uint16_t finish(uint64_t total)
{
	return (uint16_t)(~fold64(total) & 0xffffu);
}

/* The sum of the ports: the last four bytes of a flow's (tcp_buf.FlowHeader.flow). */
static uint32_t ports_sum(const unsigned char *flow, Py_ssize_t flow_len)
{
	const unsigned char *p = flow + flow_len - 4;

	return ((uint32_t)p[0] << 8 | p[1]) + ((uint32_t)p[2] << 8 | p[3]);
}

/* One frame's length word (length), Ethernet, IPv4 or IPv6 and TCP headers at h, all
 * but the TCP checksum, which depends on what follows; returns the TCP header. */
static unsigned char *put_headers(unsigned char *h, int v4, const unsigned char *start,
				  const unsigned char *flow, uint32_t length, uint32_t tcp_len,
				  uint64_t addr_sum, uint32_t seq, uint32_t ack,
				  uint32_t doff_flags, uint32_t window)
{
	unsigned char *tcp;

	put32(h, length);
	if (v4) {
		uint32_t ip_len = 20 + tcp_len;

		memcpy(h + 4, start, START4);
		put16(h + 20, ip_len);
		memcpy(h + 22, ip4_middle, sizeof(ip4_middle));
		put16(h + 28, finish(IP4_FIXED_SUM + addr_sum + ip_len));
		memcpy(h + 30, flow, FLOW4); /* addresses, then the TCP header's ports */
		tcp = h + 38;
	} else {
		memcpy(h + 4, start, START6);
		put16(h + 22, tcp_len);
		memcpy(h + 24, flow, FLOW6);
		tcp = h + 58;
	}
	put32(tcp + 4, seq);
	put32(tcp + 8, ack);
	put16(tcp + 12, doff_flags);
	put16(tcp + 14, window);
	put16(tcp + 18, 0); /* urgent pointer */
	return tcp;
}

/* An integer argument within [0, max]; -1 with an exception set otherwise. */
static long long bounded(PyObject *arg, long long max, const char *what)
{
	long long v = PyLong_AsLongLong(arg);

	if (v == -1 && PyErr_Occurred())
		return -1;
	if (v < 0 || v > max) {
		PyErr_Format(PyExc_ValueError, "%s %lld outside 0..%lld", what, v, max);
		return -1;
	}
	return v;
}

PyDoc_STRVAR(write_headers_doc,
	     "write_headers(mem, head, mss, nbytes, start, flow, addr_sum, seq, ack, window, /)"
	     " -> int\n\n"
	     "Write the headers of the frames holding nbytes of payload in slots of head + mss\n"
	     "bytes; the end of the last frame (see tcp_buf.write_headers_python).");

static PyObject *write_headers(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer mem;
	long long head, mss, nbytes, addr_sum, seq, ack, window;
	Py_ssize_t start_len, flow_len, count, full, last, i, stride, end;
	const unsigned char *start, *flow;
	uint64_t fixed;
	PyObject *out = NULL;
	int v4;

	(void)self;
	if (nargs != 10) {
		PyErr_Format(PyExc_TypeError, "write_headers() takes 10 arguments (%zd given)",
			     nargs);
		return NULL;
	}
	if ((head = bounded(args[1], HEAD6, "head")) < 0 ||
	    (mss = bounded(args[2], 65535, "mss")) < 0 ||
	    (nbytes = bounded(args[3], PY_SSIZE_T_MAX / 2, "nbytes")) < 0 ||
	    (addr_sum = bounded(args[6], 1LL << 40, "addr_sum")) < 0 ||
	    (seq = bounded(args[7], 0xffffffffLL, "seq")) < 0 ||
	    (ack = bounded(args[8], 0xffffffffLL, "ack")) < 0 ||
	    (window = bounded(args[9], 0xffff, "window")) < 0)
		return NULL;
	if (!PyBytes_Check(args[4]) || !PyBytes_Check(args[5])) {
		PyErr_SetString(PyExc_TypeError, "start and flow must be bytes");
		return NULL;
	}
	start = (const unsigned char *)PyBytes_AS_STRING(args[4]);
	start_len = PyBytes_GET_SIZE(args[4]);
	flow = (const unsigned char *)PyBytes_AS_STRING(args[5]);
	flow_len = PyBytes_GET_SIZE(args[5]);
	if (!(head == HEAD4 && start_len == START4 && flow_len == FLOW4) &&
	    !(head == HEAD6 && start_len == START6 && flow_len == FLOW6)) {
		PyErr_SetString(PyExc_ValueError,
				"head, start and flow are not those of IPv4 or IPv6 frames");
		return NULL;
	}
	if (mss == 0 || nbytes == 0) {
		PyErr_SetString(PyExc_ValueError, "mss and nbytes must be positive");
		return NULL;
	}
	if (PyObject_GetBuffer(args[0], &mem, PyBUF_WRITABLE) < 0)
		return NULL;
	stride = (Py_ssize_t)(head + mss);
	full = (Py_ssize_t)(nbytes / mss);
	last = (Py_ssize_t)(nbytes - (long long)full * mss);
	count = full + (last ? 1 : 0);
	/* (the count checked first: the end computed from a huge one would overflow) */
	if (count - 1 > mem.len / stride ||
	    (end = (count - 1) * stride + (Py_ssize_t)head + (last ? last : (Py_ssize_t)mss)) >
		    mem.len) {
		PyErr_Format(PyExc_ValueError, "%lld bytes in slots of %zd: beyond a buffer of %zd",
			     nbytes, stride, mem.len);
		goto done;
	}
	v4 = head == HEAD4;
	fixed = (uint64_t)addr_sum + IPPROTO_TCP_ + ports_sum(flow, flow_len) + (DOFF << 8) +
		TH_ACK + (uint64_t)window + ((uint64_t)ack >> 16) + ((uint64_t)ack & 0xffff);
	for (i = 0; i < count; i++) {
		unsigned char *h = (unsigned char *)mem.buf + i * stride, *tcp;
		uint32_t plen = (uint32_t)(i < full ? mss : last);
		uint32_t seg_seq = (uint32_t)((seq + (long long)i * mss) & 0xffffffffLL);
		uint32_t flags = i + 1 < count ? TH_ACK : TH_ACK | TH_PSH;
		uint32_t tcp_len = 20 + plen;
		uint64_t payload = sum_region(h + head, plen);

		tcp = put_headers(h, v4, start, flow, ETH_HLEN + (v4 ? 20u : 40u) + tcp_len,
				  tcp_len, (uint64_t)addr_sum, seg_seq, (uint32_t)ack,
				  DOFF << 8 | flags, (uint32_t)window);
		put16(tcp + 16, finish(fixed + tcp_len + (seg_seq >> 16) + (seg_seq & 0xffff) +
				       payload + (flags - TH_ACK)));
	}
	out = PyLong_FromSsize_t(end);
done:
	PyBuffer_Release(&mem);
	return out;
}

PyDoc_STRVAR(control_frame_doc,
	     "control_frame(start, flow, addr_sum, seq, ack, flags, window, options, /)"
	     " -> bytes\n\n"
	     "A segment without payload as one frame, its length word first (see\n"
	     "tcp_buf.control_frame_python).");

static PyObject *control_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	long long addr_sum, seq, ack, flags, window;
	Py_ssize_t start_len, flow_len, opt_len, length, tcp_len;
	const unsigned char *start, *flow, *options;
	unsigned char *h, *tcp;
	uint64_t total;
	uint32_t doff;
	PyObject *out;
	int v4;

	(void)self;
	if (nargs != 8) {
		PyErr_Format(PyExc_TypeError, "control_frame() takes 8 arguments (%zd given)",
			     nargs);
		return NULL;
	}
	if ((addr_sum = bounded(args[2], 1LL << 40, "addr_sum")) < 0 ||
	    (seq = bounded(args[3], 0xffffffffLL, "seq")) < 0 ||
	    (ack = bounded(args[4], 0xffffffffLL, "ack")) < 0 ||
	    (flags = bounded(args[5], 0xff, "flags")) < 0 ||
	    (window = bounded(args[6], 0xffff, "window")) < 0)
		return NULL;
	if (!PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) || !PyBytes_Check(args[7])) {
		PyErr_SetString(PyExc_TypeError, "start, flow and options must be bytes");
		return NULL;
	}
	start = (const unsigned char *)PyBytes_AS_STRING(args[0]);
	start_len = PyBytes_GET_SIZE(args[0]);
	flow = (const unsigned char *)PyBytes_AS_STRING(args[1]);
	flow_len = PyBytes_GET_SIZE(args[1]);
	options = (const unsigned char *)PyBytes_AS_STRING(args[7]);
	opt_len = PyBytes_GET_SIZE(args[7]);
	v4 = start_len == START4 && flow_len == FLOW4;
	if (!v4 && !(start_len == START6 && flow_len == FLOW6)) {
		PyErr_SetString(PyExc_ValueError, "start and flow are not those of IPv4 or IPv6");
		return NULL;
	}
	if (opt_len % 4 || opt_len > 40) {
		PyErr_Format(PyExc_ValueError, "%zd bytes of options: a multiple of 4, at most 40",
			     opt_len);
		return NULL;
	}
	tcp_len = 20 + opt_len;
	doff = (uint32_t)(tcp_len / 4) << 4;
	total = (uint64_t)addr_sum + IPPROTO_TCP_ + (uint64_t)tcp_len + ports_sum(flow, flow_len) +
		((uint64_t)seq >> 16) + ((uint64_t)seq & 0xffff) + ((uint64_t)ack >> 16) +
		((uint64_t)ack & 0xffff) + (doff << 8) + (uint64_t)flags + (uint64_t)window +
		sum_region(options, (size_t)opt_len);
	length = ETH_HLEN + (v4 ? 20 : 40) + tcp_len; /* IP header and TCP */
	if (length < ETH_MIN_FRAME)
		length = ETH_MIN_FRAME; /* padded with zeroes, as packet.ip_frame pads */
	out = PyBytes_FromStringAndSize(NULL, 4 + length);
	if (out == NULL)
		return NULL;
	h = (unsigned char *)PyBytes_AS_STRING(out);
	memset(h, 0, (size_t)(4 + length));
	tcp = put_headers(h, v4, start, flow, (uint32_t)length, (uint32_t)tcp_len,
			  (uint64_t)addr_sum, (uint32_t)seq, (uint32_t)ack,
			  doff << 8 | (uint32_t)flags, (uint32_t)window);
	put16(tcp + 16, finish(total));
	memcpy(tcp + 20, options, (size_t)opt_len);
	return out;
}

static PyMethodDef tcp_buf_methods[] = {
	{"write_headers", (PyCFunction)(void (*)(void))write_headers, METH_FASTCALL,
	 write_headers_doc},
	{"control_frame", (PyCFunction)(void (*)(void))control_frame, METH_FASTCALL,
	 control_frame_doc},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef tcp_buf_module = {
	PyModuleDef_HEAD_INIT, "_tcp_buf",
	"The headers of host->guest TCP frames in C (see passtd/engine/tcp_buf.py).", -1,
	tcp_buf_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tcp_buf(void)
{
	return PyModule_Create(&tcp_buf_module);
}
