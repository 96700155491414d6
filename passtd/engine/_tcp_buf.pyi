import mmap

def write_headers(mem: memoryview | mmap.mmap | bytearray, head: int, mss: int, nbytes: int,
                  start: bytes, flow: bytes, addr_sum: int, seq: int, ack: int, window: int,
                  /) -> int: ...

def control_frame(start: bytes, flow: bytes, addr_sum: int, seq: int, ack: int, flags: int,
                  window: int, options: bytes, /) -> bytes: ...
