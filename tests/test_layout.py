"""Every BPF header against its user-space mirrors (rome_guard/layout): the
one table, rome_guard.layout.HEADERS. No root, no BPF: gcc compiles a small
program from each header that prints every size, offset and constant."""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import subprocess

import pytest

from rome_guard.layout import HEADERS, Header

STRUCTS = [(h, struct) for h in HEADERS for struct in sorted(h.mirrors)]
CONSTANTS = [(h, name) for h in HEADERS for name in h.constants]


def _id(value) -> str:
    return value.path.name if isinstance(value, Header) else str(value)


def _c_structs(header: Header) -> dict[str, list[str]]:
    """struct name -> field names in order, read from the header."""
    text = re.sub(r"/\*.*?\*/", "", header.path.read_text(), flags=re.S)
    structs = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\};", text, flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if decl:
                fields.append(re.match(r".*?(\w+)\s*(\[[^\]]*\])?$", decl, flags=re.S).group(1))
        structs[name] = fields
    return structs


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[tuple[str, str], int]:
    """(header, fact) -> every sizeof/offsetof/constant, as the C compiler sees them."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to check the BPF record layouts (apt-get install gcc)")
    facts = {}
    for header in HEADERS:
        lines = []
        for struct, mirror in header.mirrors.items():
            lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
            for field, *_ in mirror._fields_:
                for what, expr in (
                    ("offset", f"offsetof(struct {struct}, {field})"),
                    ("size", f"sizeof(((struct {struct} *)0)->{field})"),
                ):
                    lines.append(f'printf("{what} {struct}.{field} %zu\\n", {expr});')
        for name in header.constants:
            lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        program = "\n".join(
            [
                "#include <stddef.h>",
                "#include <stdio.h>",
                f'#include "{header.path}"',
                "int main(void) {",
                *lines,
                "return 0; }",
            ]
        )
        build = tmp_path_factory.mktemp("layout")
        (build / "layout.c").write_text(program)
        subprocess.run(
            ["gcc", "-Wall", "-Werror", "-o", str(build / "layout"), str(build / "layout.c")],
            check=True,
            capture_output=True,
        )
        out = subprocess.run([str(build / "layout")], check=True, capture_output=True, text=True)
        for line in out.stdout.splitlines():
            kind, key, value = line.split()
            facts[(header.path.name, f"{kind} {key}")] = int(value)
    return facts


@pytest.mark.parametrize("header,struct", STRUCTS, ids=_id)
def test_mirror_matches_c_struct(c_layout, header, struct):
    mirror = header.mirrors[struct]
    name = header.path.name
    assert ct.sizeof(mirror) == c_layout[(name, f"sizeof {struct}")]
    for field, *_ in mirror._fields_:
        descriptor = getattr(mirror, field)
        assert descriptor.offset == c_layout[(name, f"offset {struct}.{field}")], field
        assert descriptor.size == c_layout[(name, f"size {struct}.{field}")], field


@pytest.mark.parametrize("header", HEADERS, ids=_id)
def test_mirrors_have_every_c_field_in_order(header):
    structs = _c_structs(header)
    assert set(structs) == set(header.mirrors)
    for struct, fields in structs.items():
        assert [f for f, *_ in header.mirrors[struct]._fields_] == fields, struct


@pytest.mark.parametrize("header,name", CONSTANTS, ids=_id)
def test_constant_matches_header(c_layout, header, name):
    assert header.constants[name] == c_layout[(header.path.name, f"const {name}")]
