/* _sum.h: the one's-complement sum (RFC 1071) the native parts share (_csum.c, _tcp_buf.c).
 *
 * The sum is byte order independent (RFC 1071 2.(B)), so 64-bit native words are added
 * into a 64-bit accumulator as two 32-bit halves (no carry is lost before 2^31 words, far
 * beyond any frame), folded to 16 bits and byte-swapped on little-endian machines.
 * Unaligned input is read with memcpy, which compilers turn into plain loads. A region is
 * summed as if it started on a word boundary, whatever its address, and an odd last byte
 * is the high byte of a word padded with zero, as checksum.py's pure-Python path does.
 */
#ifndef PASSTD_SUM_H
#define PASSTD_SUM_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t fold64(uint64_t acc)
{
	acc = (acc & 0xffffffffu) + (acc >> 32);
	acc = (acc & 0xffffffffu) + (acc >> 32);
	acc = (acc & 0xffffu) + (acc >> 16);
	acc = (acc & 0xffffu) + (acc >> 16);
	return (uint32_t)acc;
}

/* The sum of len bytes at p as big-endian 16-bit words, folded to 16 bits. */
static inline uint32_t sum_region(const unsigned char *p, size_t len)
{
	uint64_t acc = 0, word;
	size_t i, words = len / 8;
	unsigned char tail[8] = {0};

	for (i = 0; i < words; i++) {
		memcpy(&word, p + i * 8, 8);
		acc += (word & 0xffffffffu) + (word >> 32);
	}
	if (len & 7) {
		memcpy(tail, p + words * 8, len & 7);
		memcpy(&word, tail, 8);
		acc += (word & 0xffffffffu) + (word >> 32);
	}
	uint32_t sum = fold64(acc);
#if PY_LITTLE_ENDIAN
	sum = ((sum & 0xffu) << 8) | (sum >> 8);
#endif
	return sum;
}

#endif
