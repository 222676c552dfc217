"""Records of sensor.h decode into the event model (rome_guard/layout/sensor.py).
No root, no BPF. The struct layouts themselves are checked against the C
header in tests/test_layout.py."""

from __future__ import annotations

import ctypes as ct
import subprocess
import sys

import pytest

from rome_guard.events import CONNECT_ESTABLISHED, CONNECT_REFUSED
from rome_guard.layout import sensor as layout
from rome_guard.sensors.ebpf import BPF_DIR, compile_unit
from rome_guard.textsafe import from_bytes


def test_prog_info_mirror_matches_uapi(tmp_path):
    source = tmp_path / "info.c"
    fields = ["run_time_ns", "run_cnt", "recursion_misses"]
    prints = "".join(
        f'printf("%zu %zu\\n", offsetof(struct bpf_prog_info, {f}),'
        f" sizeof(((struct bpf_prog_info *)0)->{f}));"
        for f in fields
    )
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/bpf.h>\n"
        f"int main(void) {{ {prints} return 0; }}\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "info"), str(source)], check=True)
    out = subprocess.run([str(tmp_path / "info")], check=True, capture_output=True, text=True)
    for field, line in zip(fields, out.stdout.splitlines(), strict=True):
        offset, size = map(int, line.split())
        assert getattr(layout.BpfProgInfoHead, field).offset == offset, field
        assert getattr(layout.BpfProgInfoHead, field).size == size, field


def _flatten(value) -> list:
    if isinstance(value, ct.Structure):
        out = []
        for field, *_ in value._fields_:
            out += _flatten(getattr(value, field))
        return out
    if isinstance(value, ct.Array):
        return [bytes(value)]
    return [value]


@pytest.mark.parametrize("mirror", list(layout.FORMATS), ids=lambda m: m.__name__)
def test_decoder_formats_match_the_mirrors(mirror):
    fmt = layout.FORMATS[mirror]
    assert fmt.size == ct.sizeof(mirror)
    record = mirror()
    raw = bytearray(ct.sizeof(mirror))
    for i in range(len(raw)):
        raw[i] = (i * 7 + 3) % 251  # every byte distinct enough to catch a shift
    record = mirror.from_buffer_copy(bytes(raw))
    assert list(fmt.unpack(bytes(raw))) == _flatten(record)


def test_exec_head_is_the_fixed_part():
    assert ct.sizeof(layout.ExecRecordHead) == layout.EXEC_DATA_OFFSET


# --- decoding ------------------------------------------------------------------


def _header(record_type: int, pid: int = 4242, comm: bytes = b"prog") -> layout.RecordHeader:
    hdr = layout.RecordHeader(
        type=record_type, pid=pid, tid=pid, uid=1000, timestamp_ns=123_456_789, cgroup_id=77
    )
    ct.memmove(hdr.comm, comm, len(comm))
    return hdr


def _exec_bytes(args: list[bytes], filename: bytes, flags: int = 0, argc: int | None = None):
    data = b"".join(a + b"\0" for a in args)
    name = filename + b"\0"
    head = layout.ExecRecordHead(
        hdr=_header(layout.RECORD_EXEC),
        ppid=1,
        old_pid=4242,
        argc=len(args) if argc is None else argc,
        args_count=len(args),
        args_size=len(data),
        filename_size=len(name),
        flags=flags,
    )
    return bytes(head) + data + name


def test_exec_decodes_hostile_argv_without_loss():
    hostile = [b"/bin/sh", b"-c", b"echo x\nforged line", b"\xff\xfe\x1b[31m"]
    event = layout.decode_record(_exec_bytes(hostile, b"/usr/bin/dash"))
    assert event.argv == tuple(from_bytes(a) for a in hostile)
    assert event.argv[3].encode("utf-8", "surrogateescape") == b"\xff\xfe\x1b[31m"
    assert event.filename == "/usr/bin/dash"
    assert (event.pid, event.ppid, event.uid, event.comm) == (4242, 1, 1000, "prog")
    assert event.cgroup_id == 77
    assert not event.argv_truncated


@pytest.mark.parametrize(
    "flags", [layout.EXEC_ARGV_TRUNCATED, layout.EXEC_ARGV_MISSING, layout.EXEC_ARGV_TRUNCATED | 4]
)
def test_exec_incomplete_argv_is_flagged(flags):
    event = layout.decode_record(_exec_bytes([b"a"], b"/bin/a", flags=flags, argc=3))
    assert event.argv_truncated


def test_exec_sizes_beyond_record_are_malformed():
    raw = _exec_bytes([b"a", b"b"], b"/bin/a")
    with pytest.raises(layout.MalformedRecord):
        layout.decode_record(raw[:-3])


def test_fork_and_exit_decode():
    fork = layout.ForkRecord(hdr=_header(layout.RECORD_FORK, pid=10), child_pid=11)
    event = layout.decode_record(bytes(fork))
    assert (event.parent_pid, event.child_pid, event.timestamp_ns) == (10, 11, 123_456_789)
    exit_ = layout.ExitRecord(hdr=_header(layout.RECORD_EXIT, pid=11), exit_code=3)
    event = layout.decode_record(bytes(exit_))
    assert (event.pid, event.exit_code) == (11, 3)


def _connect(family: int, saddr: bytes, daddr: bytes, outcome: int, protocol: int = 6):
    rec = layout.ConnectRecord(
        hdr=_header(layout.RECORD_CONNECT),
        family=family,
        protocol=protocol,
        outcome=outcome,
        source=layout.SOURCE_TCP_STATE,
        sport=40000,
        dport=3333,
    )
    ct.memmove(rec.saddr, saddr, len(saddr))
    ct.memmove(rec.daddr, daddr, len(daddr))
    return bytes(rec)


def test_connect_ipv4_decodes():
    raw = _connect(2, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 9]), layout.OUTCOME_REFUSED)
    event = layout.decode_record(raw)
    ep = event.endpoint
    assert (ep.proto, ep.family, ep.saddr, ep.sport, ep.daddr, ep.dport) == (
        "tcp",
        4,
        "127.0.0.1",
        40000,
        "127.0.0.9",
        3333,
    )
    assert event.outcome == CONNECT_REFUSED == ep.state
    assert event.cgroup_id == 77


def test_connect_ipv6_and_mapped_addresses_decode():
    mapped = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    loop6 = b"\0" * 15 + b"\1"
    event = layout.decode_record(_connect(10, loop6, mapped, layout.OUTCOME_ESTABLISHED))
    assert event.endpoint.saddr == "::1"
    assert event.endpoint.daddr == "::ffff:127.0.0.1"
    assert event.endpoint.is_loopback
    assert event.outcome == CONNECT_ESTABLISHED


@pytest.mark.parametrize("protocol,proto", [(17, "udp"), (0, "udp"), (1, "icmp")])
def test_datagram_protocols(protocol, proto):
    raw = _connect(2, b"\0" * 4, bytes([127, 0, 0, 2]), layout.OUTCOME_ATTEMPT, protocol)
    assert layout.decode_record(raw).endpoint.proto == proto


def test_connect_with_unknown_values_is_malformed():
    with pytest.raises(layout.MalformedRecord):
        layout.decode_record(_connect(2, b"", b"", outcome=99))
    with pytest.raises(layout.MalformedRecord):
        layout.decode_record(_connect(1, b"", b"", layout.OUTCOME_ATTEMPT))


def test_gpu_open_decodes():
    rec = layout.GpuOpenRecord(hdr=_header(layout.RECORD_GPU_OPEN, comm=b"xmrig\n"), result=3)
    ct.memmove(rec.path, b"/dev/nvidiactl", 14)
    event = layout.decode_record(bytes(rec))
    assert (event.path, event.comm, event.pid) == ("/dev/nvidiactl", "xmrig\n", 4242)


def test_fd_dup_and_rename_decode():
    rec = layout.FdRecord(
        hdr=_header(layout.RECORD_FD_DUP, comm=b"python3"), oldfd=3, newfd=2, via=2
    )
    event = layout.decode_record(bytes(rec))
    assert (event.pid, event.oldfd, event.newfd, event.via) == (4242, 3, 2, "dup2")
    with pytest.raises(layout.MalformedRecord):  # never onto anything but stdio
        layout.decode_record(
            bytes(layout.FdRecord(hdr=_header(layout.RECORD_FD_DUP), newfd=7, via=1))
        )
    rename = layout.RenameRecord(
        hdr=_header(layout.RECORD_RENAME, comm=b"python3"), newcomm=b"xmrig"
    )
    event = layout.decode_record(bytes(rename))
    assert (event.old_comm, event.new_comm) == ("python3", "xmrig")


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", (99).to_bytes(4, sys.byteorder) + b"\0" * 200])
def test_garbage_is_malformed(raw):
    with pytest.raises(layout.MalformedRecord):
        layout.decode_record(raw)


def test_short_fixed_record_is_malformed():
    fork = bytes(layout.ForkRecord(hdr=_header(layout.RECORD_FORK)))
    with pytest.raises(layout.MalformedRecord):
        layout.decode_record(fork[:-1])


def test_compile_unit_inlines_program_files_once():
    text, cflags = compile_unit({"HAVE_OPEN"})
    for name in ("process.c", "network.c", "gpu.c"):
        assert f'#include "{name}"' not in text
        assert text.count(f'#line 1 "{name}"') == 1
    assert "int rgs_exec(" in text and "int rgs_tcp_state(" in text
    assert "-DHAVE_OPEN" in cflags and f"-I{BPF_DIR}" in cflags
