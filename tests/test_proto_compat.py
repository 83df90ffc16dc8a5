"""The serving.v1 contract stays backward compatible.

The current protos are compiled in-process and compared with the committed snapshot
(protos/serving/v1/contract.snapshot.binpb). Additions are fine; anything that can break an
existing client fails. Breaking changes belong in a new `serving.v2` package (see protos/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib.resources import as_file, files
from pathlib import Path

import pytest
from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    EnumDescriptorProto,
    EnumValueDescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
    FileDescriptorSet,
    MethodDescriptorProto,
    ServiceDescriptorProto,
)
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
V1_DIR = PROTO_ROOT / "serving" / "v1"
SNAPSHOT = V1_DIR / "contract.snapshot.binpb"
V1_PACKAGE = "serving.v1"

F = FieldDescriptorProto


# --------------------------------------------------------------------------------------------
# Comparison logic
# --------------------------------------------------------------------------------------------


def _walk_messages(prefix: str, messages: Iterable[DescriptorProto]) -> Iterator[tuple[str, DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _walk_messages(name, message.nested_type)


def _messages(fds: FileDescriptorSet) -> dict[str, DescriptorProto]:
    return {name: msg for f in fds.file for name, msg in _walk_messages(f.package, f.message_type)}


def _enums(fds: FileDescriptorSet) -> dict[str, EnumDescriptorProto]:
    found: dict[str, EnumDescriptorProto] = {}
    for f in fds.file:
        found.update({f"{f.package}.{e.name}": e for e in f.enum_type})
        for msg_name, msg in _walk_messages(f.package, f.message_type):
            found.update({f"{msg_name}.{e.name}": e for e in msg.enum_type})
    return found


def _services(fds: FileDescriptorSet) -> dict[str, ServiceDescriptorProto]:
    return {f"{f.package}.{s.name}": s for f in fds.file for s in f.service}


def _is_reserved(message: DescriptorProto, number: int) -> bool:
    # Reserved ranges in a descriptor are half-open: [start, end).
    return any(r.start <= number < r.end for r in message.reserved_range)


def _field_changes(name: str, old: DescriptorProto, new: DescriptorProto) -> list[str]:
    problems: list[str] = []
    new_fields = {f.name: f for f in new.field}
    for old_field in old.field:
        where = f"field {name}.{old_field.name}"
        new_field = new_fields.get(old_field.name)
        if new_field is None:
            if not _is_reserved(new, old_field.number):
                problems.append(f"{where} (= {old_field.number}) removed without reserving its number")
            continue
        if new_field.number != old_field.number:
            problems.append(f"{where} renumbered {old_field.number} -> {new_field.number}")
        if new_field.type != old_field.type:
            old_type, new_type = F.Type.Name(old_field.type), F.Type.Name(new_field.type)
            problems.append(f"{where} type changed {old_type} -> {new_type}")
        if new_field.type_name != old_field.type_name:
            problems.append(f"{where} type_name changed {old_field.type_name} -> {new_field.type_name}")
        if new_field.label != old_field.label:
            old_label, new_label = F.Label.Name(old_field.label), F.Label.Name(new_field.label)
            problems.append(f"{where} label changed {old_label} -> {new_label}")
    return problems


def _enum_changes(name: str, old: EnumDescriptorProto, new: EnumDescriptorProto) -> list[str]:
    problems: list[str] = []
    new_values = {v.name: v for v in new.value}
    for old_value in old.value:
        new_value = new_values.get(old_value.name)
        if new_value is None:
            problems.append(f"enum value {name}.{old_value.name} (= {old_value.number}) removed")
        elif new_value.number != old_value.number:
            problems.append(f"enum value {name}.{old_value.name} renumbered {old_value.number} -> {new_value.number}")
    return problems


def _method_changes(name: str, old: ServiceDescriptorProto, new: ServiceDescriptorProto) -> list[str]:
    problems: list[str] = []
    new_methods = {m.name: m for m in new.method}
    for old_method in old.method:
        where = f"method {name}.{old_method.name}"
        new_method = new_methods.get(old_method.name)
        if new_method is None:
            problems.append(f"{where} removed")
            continue
        if new_method.input_type != old_method.input_type:
            problems.append(f"{where} input type changed {old_method.input_type} -> {new_method.input_type}")
        if new_method.output_type != old_method.output_type:
            problems.append(f"{where} output type changed {old_method.output_type} -> {new_method.output_type}")
        if new_method.client_streaming != old_method.client_streaming:
            problems.append(f"{where} client streaming changed to {new_method.client_streaming}")
        if new_method.server_streaming != old_method.server_streaming:
            problems.append(f"{where} server streaming changed to {new_method.server_streaming}")
    return problems


def breaking_changes(old: FileDescriptorSet, new: FileDescriptorSet) -> list[str]:
    """Every way `new` breaks clients built against `old`; empty when `new` only adds."""
    problems: list[str] = []
    new_messages = _messages(new)
    for name, message in _messages(old).items():
        if name not in new_messages:
            problems.append(f"message {name} removed")
        else:
            problems.extend(_field_changes(name, message, new_messages[name]))
    new_enums = _enums(new)
    for name, enum in _enums(old).items():
        if name not in new_enums:
            problems.append(f"enum {name} removed")
        else:
            problems.extend(_enum_changes(name, enum, new_enums[name]))
    new_services = _services(new)
    for name, service in _services(old).items():
        if name not in new_services:
            problems.append(f"service {name} removed")
        else:
            problems.extend(_method_changes(name, service, new_services[name]))
    return problems


# --------------------------------------------------------------------------------------------
# The real contract
# --------------------------------------------------------------------------------------------


def _v1_proto_files() -> list[Path]:
    return sorted(V1_DIR.glob("*.proto"))


def _load(path: Path) -> FileDescriptorSet:
    return FileDescriptorSet.FromString(path.read_bytes())


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> FileDescriptorSet:
    out = tmp_path_factory.mktemp("proto") / "current.binpb"
    with as_file(files("grpc_tools") / "_proto") as well_known:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--descriptor_set_out={out}",
                *(str(p) for p in _v1_proto_files()),
            ]
        )
    assert rc == 0, "protoc failed to compile protos/serving/v1"
    return _load(out)


@pytest.fixture(scope="module")
def snapshot() -> FileDescriptorSet:
    return _load(SNAPSHOT)


def test_v1_is_backward_compatible_with_snapshot(snapshot: FileDescriptorSet, current: FileDescriptorSet) -> None:
    problems = breaking_changes(snapshot, current)
    assert not problems, (
        "serving.v1 must stay backward compatible; put breaking changes in serving.v2.\n  " + "\n  ".join(problems)
    )


def test_snapshot_holds_only_the_v1_files(snapshot: FileDescriptorSet) -> None:
    names = {f.name for f in snapshot.file}
    assert {"serving/v1/common.proto", "serving/v1/inference.proto", "serving/v1/models.proto"} <= names
    assert not any(n.startswith("google/") for n in names)
    assert {f.package for f in snapshot.file} == {V1_PACKAGE}


def test_every_v1_file_is_in_package_serving_v1(current: FileDescriptorSet) -> None:
    expected = {f"serving/v1/{p.name}" for p in _v1_proto_files()}
    assert expected
    packages = {f.name: f.package for f in current.file}
    assert set(packages) == expected
    wrong = {name: pkg for name, pkg in packages.items() if pkg != V1_PACKAGE}
    assert not wrong, f"every file in protos/serving/v1 must declare `package {V1_PACKAGE};`: {wrong}"


# --------------------------------------------------------------------------------------------
# breaking_changes itself, on hand-built descriptor sets
# --------------------------------------------------------------------------------------------


def _field(name: str, number: int, kind: int, *, type_name: str = "", repeated: bool = False) -> FieldDescriptorProto:
    label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    return F(name=name, number=number, type=kind, type_name=type_name, label=label)


def _base() -> FileDescriptorSet:
    request = DescriptorProto(
        name="Req",
        field=[
            _field("name", 1, F.TYPE_STRING),
            _field("tags", 2, F.TYPE_STRING, repeated=True),
            _field("usage", 3, F.TYPE_MESSAGE, type_name=".serving.v1.Usage"),
            _field("color", 4, F.TYPE_ENUM, type_name=".serving.v1.Color"),
        ],
        nested_type=[DescriptorProto(name="Inner", field=[_field("x", 1, F.TYPE_INT32)])],
    )
    usage = DescriptorProto(name="Usage", field=[_field("tokens", 1, F.TYPE_UINT32)])
    other = DescriptorProto(name="Other")
    color = EnumDescriptorProto(
        name="Color",
        value=[
            EnumValueDescriptorProto(name="COLOR_UNSPECIFIED", number=0),
            EnumValueDescriptorProto(name="COLOR_RED", number=1),
        ],
    )
    service = ServiceDescriptorProto(
        name="Svc",
        method=[
            MethodDescriptorProto(name="Get", input_type=".serving.v1.Req", output_type=".serving.v1.Usage"),
            MethodDescriptorProto(
                name="Watch", input_type=".serving.v1.Req", output_type=".serving.v1.Usage", server_streaming=True
            ),
        ],
    )
    return FileDescriptorSet(
        file=[
            FileDescriptorProto(
                name="serving/v1/t.proto",
                package=V1_PACKAGE,
                syntax="proto3",
                message_type=[request, usage, other],
                enum_type=[color],
                service=[service],
            )
        ]
    )


def _msg(fds: FileDescriptorSet, name: str) -> DescriptorProto:
    return next(m for m in fds.file[0].message_type if m.name == name)


def _req_field(fds: FileDescriptorSet, name: str) -> FieldDescriptorProto:
    return next(f for f in _msg(fds, "Req").field if f.name == name)


def _method(fds: FileDescriptorSet, name: str) -> MethodDescriptorProto:
    return next(m for m in fds.file[0].service[0].method if m.name == name)


def _remove_field(fds: FileDescriptorSet, name: str) -> None:
    _msg(fds, "Req").field.remove(_req_field(fds, name))


def _remove_and_reserve_field(fds: FileDescriptorSet) -> None:
    _remove_field(fds, "tags")
    _msg(fds, "Req").reserved_range.add(start=2, end=3)
    _msg(fds, "Req").reserved_name.append("tags")


def _set_field(name: str, **changes: object) -> Callable[[FileDescriptorSet], None]:
    def mutate(fds: FileDescriptorSet) -> None:
        field = _req_field(fds, name)
        for attr, value in changes.items():
            setattr(field, attr, value)

    return mutate


def _set_method(name: str, **changes: object) -> Callable[[FileDescriptorSet], None]:
    def mutate(fds: FileDescriptorSet) -> None:
        method = _method(fds, name)
        for attr, value in changes.items():
            setattr(method, attr, value)

    return mutate


def _remove_message(fds: FileDescriptorSet) -> None:
    fds.file[0].message_type.remove(_msg(fds, "Other"))


def _remove_nested_field(fds: FileDescriptorSet) -> None:
    del _msg(fds, "Req").nested_type[0].field[:]


def _remove_enum(fds: FileDescriptorSet) -> None:
    del fds.file[0].enum_type[:]


def _remove_enum_value(fds: FileDescriptorSet) -> None:
    del fds.file[0].enum_type[0].value[1]


def _renumber_enum_value(fds: FileDescriptorSet) -> None:
    fds.file[0].enum_type[0].value[1].number = 7


def _remove_service(fds: FileDescriptorSet) -> None:
    del fds.file[0].service[:]


def _remove_method(fds: FileDescriptorSet) -> None:
    fds.file[0].service[0].method.remove(_method(fds, "Get"))


BREAKING: dict[str, tuple[Callable[[FileDescriptorSet], None], str]] = {
    "message removed": (_remove_message, "message serving.v1.Other removed"),
    "enum removed": (_remove_enum, "enum serving.v1.Color removed"),
    "service removed": (_remove_service, "service serving.v1.Svc removed"),
    "method removed": (_remove_method, "method serving.v1.Svc.Get removed"),
    "field removed": (
        lambda fds: _remove_field(fds, "tags"),
        "field serving.v1.Req.tags (= 2) removed without reserving its number",
    ),
    "nested field removed": (
        _remove_nested_field,
        "field serving.v1.Req.Inner.x (= 1) removed without reserving its number",
    ),
    "field renumbered": (_set_field("name", number=9), "field serving.v1.Req.name renumbered 1 -> 9"),
    "field type changed": (
        _set_field("name", type=F.TYPE_BYTES),
        "field serving.v1.Req.name type changed TYPE_STRING -> TYPE_BYTES",
    ),
    "field type_name changed": (
        _set_field("usage", type_name=".serving.v1.Other"),
        "field serving.v1.Req.usage type_name changed .serving.v1.Usage -> .serving.v1.Other",
    ),
    "field made singular": (
        _set_field("tags", label=F.LABEL_OPTIONAL),
        "field serving.v1.Req.tags label changed LABEL_REPEATED -> LABEL_OPTIONAL",
    ),
    "field made repeated": (
        _set_field("name", label=F.LABEL_REPEATED),
        "field serving.v1.Req.name label changed LABEL_OPTIONAL -> LABEL_REPEATED",
    ),
    "method input changed": (
        _set_method("Get", input_type=".serving.v1.Other"),
        "method serving.v1.Svc.Get input type changed .serving.v1.Req -> .serving.v1.Other",
    ),
    "method output changed": (
        _set_method("Get", output_type=".serving.v1.Other"),
        "method serving.v1.Svc.Get output type changed .serving.v1.Usage -> .serving.v1.Other",
    ),
    "method made client streaming": (
        _set_method("Get", client_streaming=True),
        "method serving.v1.Svc.Get client streaming changed to True",
    ),
    "method made server streaming": (
        _set_method("Get", server_streaming=True),
        "method serving.v1.Svc.Get server streaming changed to True",
    ),
    "method no longer streaming": (
        _set_method("Watch", server_streaming=False),
        "method serving.v1.Svc.Watch server streaming changed to False",
    ),
    "enum value removed": (_remove_enum_value, "enum value serving.v1.Color.COLOR_RED (= 1) removed"),
    "enum value renumbered": (_renumber_enum_value, "enum value serving.v1.Color.COLOR_RED renumbered 1 -> 7"),
}


@pytest.mark.parametrize(("mutate", "expected"), BREAKING.values(), ids=BREAKING.keys())
def test_breaking_change_is_reported(mutate: Callable[[FileDescriptorSet], None], expected: str) -> None:
    old = _base()
    new = _base()
    mutate(new)
    assert breaking_changes(old, new) == [expected]


def _add_everything(fds: FileDescriptorSet) -> None:
    file = fds.file[0]
    _msg(fds, "Req").field.append(_field("seed", 5, F.TYPE_UINT64))
    file.message_type.add(name="Extra", field=[_field("id", 1, F.TYPE_STRING)])
    file.enum_type[0].value.add(name="COLOR_BLUE", number=2)
    file.enum_type.add(name="Shape", value=[EnumValueDescriptorProto(name="SHAPE_UNSPECIFIED", number=0)])
    file.service[0].method.add(name="Put", input_type=".serving.v1.Req", output_type=".serving.v1.Usage")
    file.service.add(name="Other")


ALLOWED: dict[str, Callable[[FileDescriptorSet], None]] = {
    "unchanged": lambda fds: None,
    "field added": lambda fds: _msg(fds, "Req").field.append(_field("seed", 5, F.TYPE_UINT64)),
    "messages, enums, values, methods and services added": _add_everything,
    "field removed with its number reserved": _remove_and_reserve_field,
}


@pytest.mark.parametrize("mutate", ALLOWED.values(), ids=ALLOWED.keys())
def test_compatible_change_passes(mutate: Callable[[FileDescriptorSet], None]) -> None:
    new = _base()
    mutate(new)
    assert breaking_changes(_base(), new) == []


def test_reserved_range_end_is_exclusive() -> None:
    new = _base()
    _remove_field(new, "tags")
    _msg(new, "Req").reserved_range.add(start=1, end=2)  # reserves 1 only; tags was 2
    assert breaking_changes(_base(), new) == ["field serving.v1.Req.tags (= 2) removed without reserving its number"]
