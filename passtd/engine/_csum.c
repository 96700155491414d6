/* _csum: the Internet checksum's one's-complement sum (RFC 1071) in C.
 *
 * Design: the one inner loop checksum.py would otherwise leave to numpy, as two calls over
 * the buffer protocol: one region, or rows of a batch. The sum itself is _sum.h's (shared
 * with _tcp_buf.c).
 *
 * Why it exists: numpy, the pure-Python path's engine for large buffers, costs an instance
 * ~15 MiB of resident memory once it has carried bulk data, and Python's own integers sum
 * a 64 KiB frame about ten times slower (docs/BENCHMARK.md). setup.sh builds it; without
 * it (or with PASSTD_NATIVE=0) checksum.py runs its pure-Python path, tested the same.
 *
 * Deliberately not done: verifying received checksums (passtd never does), SIMD beyond
 * what the compiler vectorises on its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_sum.h"

/* Region [offset, offset + length) of a buffer of size; length -1: to its end. */
static int region(Py_ssize_t size, Py_ssize_t offset, Py_ssize_t *length)
{
	if (offset < 0 || offset > size) {
		PyErr_Format(PyExc_ValueError, "offset %zd outside a buffer of %zd bytes", offset,
			     size);
		return -1;
	}
	if (*length == -1)
		*length = size - offset;
	if (*length < 0 || *length > size - offset) {
		PyErr_Format(PyExc_ValueError,
			     "%zd bytes at offset %zd: beyond a buffer of %zd bytes", *length,
			     offset, size);
		return -1;
	}
	return 0;
}

PyDoc_STRVAR(partial_doc,
	     "partial(buf, offset=0, length=-1, /) -> int\n\n"
	     "One's-complement sum of buf[offset:offset+length] as big-endian 16-bit words,\n"
	     "folded to 16 bits (length -1: to the end).");

/* Released around sums this long and longer: for a header or a small reply, taking the
 * GIL back costs more than the sum. */
#define GIL_FREE_BYTES 16384

/* Arguments as METH_FASTCALL passes them: a tuple and PyArg_ParseTuple's format walk cost
 * more than summing a small segment (a request/response calls this once per reply). */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t min,
		      Py_ssize_t max, const char *name, Py_buffer *buf, Py_ssize_t *ints)
{
	Py_ssize_t i;

	if (nargs < min || nargs > max) {
		PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", name,
			     min, max, nargs);
		return -1;
	}
	for (i = 1; i < nargs; i++) {
		ints[i - 1] = PyNumber_AsSsize_t(args[i], PyExc_OverflowError);
		if (ints[i - 1] == -1 && PyErr_Occurred())
			return -1;
	}
	return PyObject_GetBuffer(args[0], buf, PyBUF_SIMPLE);
}

static PyObject *csum_partial(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf;
	Py_ssize_t ints[2] = {0, -1};
	uint32_t sum;

	(void)self;
	if (parse_args(args, nargs, 1, 3, "partial", &buf, ints) < 0)
		return NULL;
	if (region(buf.len, ints[0], &ints[1]) < 0) {
		PyBuffer_Release(&buf);
		return NULL;
	}
	if (ints[1] >= GIL_FREE_BYTES) {
		Py_BEGIN_ALLOW_THREADS
		sum = sum_region((const unsigned char *)buf.buf + ints[0], (size_t)ints[1]);
		Py_END_ALLOW_THREADS
	} else {
		sum = sum_region((const unsigned char *)buf.buf + ints[0], (size_t)ints[1]);
	}
	PyBuffer_Release(&buf);
	return PyLong_FromUnsignedLong(sum);
}

PyDoc_STRVAR(sum_rows_doc,
	     "sum_rows(buf, offset, stride, rows, length, /) -> list[int]\n\n"
	     "partial() of rows regions of length bytes each, stride bytes apart from offset.");

static PyObject *csum_sum_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf;
	Py_ssize_t ints[4], offset, stride, rows, length, i, span;
	PyObject *out = NULL;

	(void)self;
	if (parse_args(args, nargs, 5, 5, "sum_rows", &buf, ints) < 0)
		return NULL;
	offset = ints[0];
	stride = ints[1];
	rows = ints[2];
	length = ints[3];
	if (rows < 0 || stride < 0 || length < 0) {
		PyErr_SetString(PyExc_ValueError, "rows, stride and length must not be negative");
		goto done;
	}
	if (rows > 0 && (stride != 0 && rows - 1 > (PY_SSIZE_T_MAX - length) / stride)) {
		PyErr_SetString(PyExc_ValueError, "rows * stride overflows");
		goto done;
	}
	span = rows ? (rows - 1) * stride + length : 0;
	if (region(buf.len, offset, &span) < 0)
		goto done;
	out = PyList_New(rows);
	if (out == NULL)
		goto done;
	for (i = 0; i < rows; i++) {
		const unsigned char *p = (const unsigned char *)buf.buf + offset + i * stride;
		PyObject *sum = PyLong_FromUnsignedLong(sum_region(p, (size_t)length));

		if (sum == NULL) {
			Py_CLEAR(out);
			goto done;
		}
		PyList_SET_ITEM(out, i, sum);
	}
done:
	PyBuffer_Release(&buf);
	return out;
}

static PyMethodDef csum_methods[] = {
	{"partial", (PyCFunction)(void (*)(void))csum_partial, METH_FASTCALL, partial_doc},
	{"sum_rows", (PyCFunction)(void (*)(void))csum_sum_rows, METH_FASTCALL, sum_rows_doc},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef csum_module = {
	PyModuleDef_HEAD_INIT, "_csum",
	"The Internet checksum's sum in C (see passtd/engine/checksum.py).", -1, csum_methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__csum(void)
{
	return PyModule_Create(&csum_module);
}
