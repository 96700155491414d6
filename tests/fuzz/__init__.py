"""Coverage-guided fuzzing of everything a guest can send (see README.md in this folder).

targets.py       pure targets: framing, single frames, ARP, DHCP, DHCPv6, NDP
tcp_target.py    TcpConn under segment sequences, with a model of the host socket
engine_target.py the whole Engine on a real event loop (only inside a lab namespace)
isolation.py     the check that keeps the engine target inside that namespace
oracle.py        independent checks of what the engine sends to the guest
frames.py        configurations and scapy-built seed frames
driver.py        a pure-Python coverage-guided fuzzer (the in-suite runs)
run.py           the command line: long runs with atheris, reproduction of crashes
"""
