"""Member offsets of kernel structs, read from the running kernel's own BTF
(/sys/kernel/btf/vmlinux), for BPF programs that must read a struct the
tracepoint does not copy out (a raw tracepoint gets only the pointers).

The headers BCC compiles against may not match the running kernel, so a
program never uses their offsets: user space looks the members up here and
passes them as -D constants (CO-RE's idea, without libbpf). A member that is
missing, or a bitfield, is reported as None, and the program that needs it
is not built (the caller falls back to a tracepoint that copies the fields).

Reads one file; never loads BPF, never guesses an offset.
"""

from __future__ import annotations

import struct
from typing import Iterable

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h) and the bytes each adds after btf_type
_STRUCT, _UNION = 4, 5
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")


class BtfError(ValueError):
    """The file is not BTF this reader understands."""


class Btf:
    """The struct and union types of one BTF blob, by name."""

    def __init__(self, data: bytes):
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        self._data = data
        self._strings = hdr_len + str_off
        self._string_end = self._strings + str_len
        # type id -> (kind, kind_flag, vlen, offset of its members); id 0 is void
        self._types: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
        self._by_name: dict[str, int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, _size = _TYPE.unpack_from(data, pos)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += _TYPE.size
            self._types.append((kind, kind_flag, vlen, pos))
            if kind in (_STRUCT, _UNION) and name_off:
                self._by_name.setdefault(self._name(name_off), len(self._types) - 1)
            pos += _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_MEMBER.get(kind, 0) * vlen

    @classmethod
    def of_running_kernel(cls) -> Btf:
        with open(VMLINUX_BTF, "rb") as f:
            return cls(f.read())

    def _name(self, offset: int) -> str:
        start = self._strings + offset
        return self._data[start : self._data.index(b"\0", start, self._string_end)].decode()

    def member_offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of member in struct_name (looked up through anonymous
        structs and unions); None when absent or a bitfield."""
        type_id = self._by_name.get(struct_name)
        if type_id is None:
            return None
        found = self._find(type_id, member, 0)
        if found is None or found % 8:
            return None
        return found // 8

    def _find(self, type_id: int, member: str, base_bits: int) -> int | None:
        kind, kind_flag, vlen, pos = self._types[type_id]
        if kind not in (_STRUCT, _UNION):
            return None
        anonymous = []
        for n in range(vlen):
            name_off, member_type, offset = _MEMBER.unpack_from(self._data, pos + n * 12)
            if kind_flag:
                if offset >> 24:  # a bitfield: not readable with one load
                    if name_off and self._name(name_off) == member:
                        return None
                    continue
                offset &= 0xFFFFFF
            if not name_off:
                anonymous.append((member_type, base_bits + offset))
            elif self._name(name_off) == member:
                return base_bits + offset
        for member_type, bits in anonymous:
            found = self._find(self._resolved(member_type), member, bits)
            if found is not None:
                return found
        return None

    def _resolved(self, type_id: int) -> int:
        """type_id through typedefs and qualifiers."""
        for _ in range(16):
            kind, _flag, _vlen, pos = self._types[type_id]
            if kind not in (8, 9, 10, 11, 18):  # typedef, volatile, const, restrict, type tag
                return type_id
            type_id = _TYPE.unpack_from(self._data, pos - _TYPE.size)[2]
        return type_id


def offsets(btf: Btf, wanted: Iterable[tuple[str, str, str]]) -> dict[str, int] | None:
    """{macro: offset} for every (macro, struct, member) wanted; None when
    any one is not there."""
    found = {}
    for macro, struct_name, member in wanted:
        offset = btf.member_offset(struct_name, member)
        if offset is None:
            return None
        found[macro] = offset
    return found
