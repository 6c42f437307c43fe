"""Hypothesis strategies for any protobuf message, built from its descriptor.

``payloads(descriptor, hints)`` draws the bytes of one request of that message type, so every
service's every method is fuzzed by the same walker, never by hand-written message shapes:

- a message (``messages``): each field present or missing; scalars over their whole range
  (every int width, doubles and floats incl. NaN, infinities and -0.0, open enums incl. unknown
  values); strings empty, printable, unicode, control characters, and huge; bytes of any length
  incl. exactly 16 (a block hash) and huge; repeated fields short or huge (one drawn element
  repeated up to ~1 Mi times, within ``MAX_REPEATED_BYTES``); nested messages (depth-bounded);
  each oneof unset or on any one branch;
- two messages concatenated (protobuf merges them: several oneof branches on the wire at once,
  last one wins; repeated fields appended);
- a message with a wire-level mutation appended: a string field holding bytes that are not
  UTF-8, a field with the wrong wire type, an unknown field, a truncated length or varint;
- random bytes;
- given ``seeds`` (valid requests of the type), a seed with up to three fields replaced by
  walker values or cleared (``near``): most checks sit behind others, and a near-valid request
  reaches them where a blind one stops at the first.

``hints`` feed values a blind walker would hardly hit (a live reservation id, the model's
fingerprint, a server's address) in beside the generic ones, keyed by the field's full name
(``banaserve.v1.KVTarget.address``) or its bare name (``reservation_id``); a hint is a strategy,
or a callable returning a list (read when drawn: ids a server handed out earlier in the run). A
hinted field takes its hint two times in three; a repeated field's hint is for the whole list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

Hint = st.SearchStrategy[Any] | Callable[[], list[Any]]
Hints = Mapping[str, Hint]
# A field (by its path from the message) and its new value; None: the field is cleared.
Edit = tuple[tuple[FieldDescriptor, ...], Any]

MAX_DEPTH = 4
# A huge repeated field stops here (serialized), whatever its count.
MAX_REPEATED_BYTES = 6 << 20
HUGE_COUNTS = (17, 129, 257, 2049, 1 << 16, (1 << 18) + 1)
HUGE_STRINGS = (129, 257, 4097, 1 << 16, (1 << 16) + 1, 1 << 20)
EDGE_STRINGS = (
    "",
    " ",
    "a b",
    "\x00",
    "\n\t",
    "\x7f",
    "é",
    "\u202e",
    "\U0001f600" * 40,
    "-1",
    "127.0.0.1:1",
    "[::1]:0",
    "x" * 128,
    "x" * 256,
)
EDGE_BYTES = (b"", b"\x00", b"\xff" * 15, b"\x00" * 16, b"\xff" * 17, b"\x00" * 1024)

_I32 = (-(1 << 31), (1 << 31) - 1)
_U32 = (0, (1 << 32) - 1)
_I64 = (-(1 << 63), (1 << 63) - 1)
_U64 = (0, (1 << 64) - 1)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: _I32,
    FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32,
    FieldDescriptor.TYPE_UINT32: _U32,
    FieldDescriptor.TYPE_FIXED32: _U32,
    FieldDescriptor.TYPE_INT64: _I64,
    FieldDescriptor.TYPE_SINT64: _I64,
    FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_UINT64: _U64,
    FieldDescriptor.TYPE_FIXED64: _U64,
}
# Wire types (protobuf encoding): what each field type is written as.
_VARINT, _I64_WIRE, _LEN, _I32_WIRE = 0, 1, 2, 5
_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: _I64_WIRE,
    FieldDescriptor.TYPE_FIXED64: _I64_WIRE,
    FieldDescriptor.TYPE_SFIXED64: _I64_WIRE,
    FieldDescriptor.TYPE_FLOAT: _I32_WIRE,
    FieldDescriptor.TYPE_FIXED32: _I32_WIRE,
    FieldDescriptor.TYPE_SFIXED32: _I32_WIRE,
    FieldDescriptor.TYPE_STRING: _LEN,
    FieldDescriptor.TYPE_BYTES: _LEN,
    FieldDescriptor.TYPE_MESSAGE: _LEN,
}


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _hinted(hints: Hints, field: FieldDescriptor, generic: st.SearchStrategy[Any]):
    hint = hints.get(field.full_name, hints.get(field.name))
    if hint is None:
        return generic
    if isinstance(hint, st.SearchStrategy):
        return weighted((2, hint), (1, generic))
    source = hint  # a callable: what the servers handed out so far, read when drawn

    def pick(drawn: tuple[int, Any]) -> Any:
        # Both are drawn whatever the source holds now: hypothesis replays and mutates draws,
        # so what is drawn must not depend on state outside the test case.
        i, fallback = drawn
        values = source()
        return values[i % len(values)] if values else fallback

    return weighted((2, st.tuples(st.integers(0, 1 << 16), generic).map(pick)), (1, generic))


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn about ``weight`` times as often as a weight of 1."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def _huge_string(n: int) -> st.SearchStrategy[str]:
    return st.sampled_from("x\u00e9\U0001f600 ").map(lambda c: c * n)


def strings() -> st.SearchStrategy[str]:
    return weighted(
        (4, st.text(max_size=24)),
        (3, st.sampled_from(EDGE_STRINGS)),
        (1, st.sampled_from(HUGE_STRINGS).flatmap(_huge_string)),
        (1, st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=8)),
    )


def binaries() -> st.SearchStrategy[bytes]:
    return weighted(
        (3, st.binary(max_size=48)),
        (3, st.binary(min_size=16, max_size=16)),
        (2, st.sampled_from(EDGE_BYTES)),
        (1, st.sampled_from((1 << 16, 1 << 20)).map(lambda n: b"\xa5" * n)),
    )


def scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return st.integers(lo, hi)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 64 if t == FieldDescriptor.TYPE_DOUBLE else 32
        # Non-finite values as often as a tenth: ``floats`` alone draws them rarely.
        return weighted(
            (9, st.floats(allow_nan=True, allow_infinity=True, width=width)),
            (1, st.sampled_from((math.nan, math.inf, -math.inf))),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return strings()
    if t == FieldDescriptor.TYPE_BYTES:
        return binaries()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(*_I32))  # proto3 enums are open
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def _approx_bytes(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value) + 2
    if isinstance(value, Message):
        return value.ByteSize() + 2
    return 10


def _repeat(pair: tuple[Any, int]) -> list[Any]:
    value, count = pair
    return [value] * min(count, MAX_REPEATED_BYTES // _approx_bytes(value))


def _is_real_oneof(oneof: Any) -> bool:
    # proto3 `optional` fields live in a synthetic oneof of their own, named "_" + the field.
    fields = oneof.fields
    return not (len(fields) == 1 and oneof.name == "_" + fields[0].name)


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


class _Builder:
    """Strategies for the messages reachable from one request type, each built once (building
    a strategy per draw costs more than drawing from it)."""

    def __init__(self, hints: Hints) -> None:
        self._hints = hints
        self._messages: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth)
        if key not in self._messages:
            self._messages[key] = self._build(descriptor, depth)
        return self._messages[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_class(descriptor)
        if depth > MAX_DEPTH:
            return st.builds(cls)
        oneofs = [o for o in descriptor.oneofs if _is_real_oneof(o)]
        in_oneof = {f.name for o in oneofs for f in o.fields}
        fields = [(f, self._field(f, depth)) for f in descriptor.fields if f.name not in in_oneof]
        branches = [
            st.sampled_from(list(o.fields)).flatmap(
                lambda f, d=depth: self._value(f, d).map(lambda v, f=f: (f, v))
            )
            for o in oneofs
        ]

        @st.composite
        def message(draw: Any) -> Message:
            m = cls()
            for field, values in fields:
                if draw(st.integers(0, 3)):  # any field may be missing (one time in four)
                    _set(m, field, draw(values))
            for branch in branches:
                if draw(st.integers(0, 3)):  # a oneof unset (one time in four), or on a branch
                    _set(m, *draw(branch))
            return m

        return message()

    def _field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if not field.is_repeated:
            return self._value(field, depth)
        values = self._generic(field, depth)
        generic = weighted(
            (5, st.lists(values, max_size=6)),
            (1, st.tuples(values, st.sampled_from(HUGE_COUNTS)).map(_repeat)),
        )
        # A repeated field's hint is for the whole list, not for each element.
        return _hinted(self._hints, field, generic)

    def _value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        return _hinted(self._hints, field, self._generic(field, depth))

    def _generic(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        return scalars(field)

    def edits(self, descriptor: Descriptor) -> st.SearchStrategy[list[Edit]]:
        """Up to three fields of a ``descriptor`` message, top-level or one level down, each to
        be replaced by a walker value or cleared (``edited``)."""
        paths = [(f,) for f in descriptor.fields] + [
            (f, g)
            for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated
            for g in f.message_type.fields
        ]
        one = [
            st.tuples(st.just(path), st.one_of(st.none(), self._field(path[-1], len(path))))
            for path in paths
        ]
        return st.lists(st.sampled_from(one).flatmap(lambda e: e), max_size=3)

    def near(self, seeds: Sequence[Message]) -> st.SearchStrategy[Message]:
        """A seed (a valid message) with up to three fields broken (``edits``)."""
        pairs = st.tuples(st.sampled_from(list(seeds)), self.edits(seeds[0].DESCRIPTOR))
        return pairs.map(lambda p: edited(*p))


def edited(seed: Message, edits: list[Edit]) -> Message:
    """A copy of ``seed`` with ``edits`` applied (a value of None clears the field)."""
    message = type(seed)()
    message.CopyFrom(seed)
    for path, value in edits:
        parent = message
        for field in path[:-1]:
            parent = getattr(parent, field.name)
        parent.ClearField(path[-1].name)
        if value is not None:
            _set(parent, path[-1], value)
    return message


def messages(descriptor: Descriptor, hints: Hints | None = None) -> st.SearchStrategy[Message]:
    return _Builder(hints or {}).message(descriptor, 0)


def edits(descriptor: Descriptor, hints: Hints | None = None) -> st.SearchStrategy[list[Edit]]:
    """Edits for ``edited``: how a valid message known only when the test runs (one naming a
    reservation just made) is broken a field or three at a time."""
    return _Builder(hints or {}).edits(descriptor)


# -- the wire level ------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def record(number: int, wire_type: int, body: bytes) -> bytes:
    """One field on the wire: its tag, then ``body`` (a LEN field's body gets its length)."""
    tag = varint(number << 3 | wire_type)
    return tag + (varint(len(body)) + body if wire_type == _LEN else body)


_NOT_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80", b"\xf8\x88\x80\x80\x80")


def _mutations(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes to append to a valid message of ``descriptor``, each making it a little wrong."""
    fields = list(descriptor.fields)
    strings_ = [f for f in fields if f.type == FieldDescriptor.TYPE_STRING]
    options = [
        st.tuples(st.integers(1, (1 << 29) - 1), st.binary(max_size=8)).map(
            lambda p: record(p[0], _LEN, p[1])  # an unknown (or a known) field
        ),
        st.sampled_from([b"\x80", b"\x0a", b"\x0a\x05ab", b"\x08\xff\xff", b"\x00", b"\x07"]),
    ]
    if strings_:
        options.append(
            st.tuples(st.sampled_from(strings_), st.sampled_from(_NOT_UTF8)).map(
                lambda p: record(p[0].number, _LEN, p[1])
            )
        )
    if fields:
        options.append(  # the wrong wire type for a field
            st.tuples(st.sampled_from(fields), st.sampled_from([_VARINT, _I64_WIRE, _I32_WIRE]))
            .filter(lambda p: _WIRE_TYPES.get(p[0].type, _VARINT) != p[1])
            .map(lambda p: record(p[0].number, p[1], b"\x01" * (8 if p[1] == _I64_WIRE else 4)))
        )
    return st.one_of(options)


def payloads(
    descriptor: Descriptor, hints: Hints | None = None, seeds: Sequence[Message] = ()
) -> st.SearchStrategy[bytes]:
    """The bytes of one request of message type ``descriptor`` (module docstring); with
    ``seeds`` (valid requests), a third of them are a seed broken a little (``near``)."""
    builder = _Builder(hints or {})
    one = builder.message(descriptor, 0).map(lambda m: m.SerializeToString())
    kinds = [
        (2, one),  # a plain message is drawn as often as each kind of abuse below
        (1, st.tuples(one, one).map(b"".join)),
        (1, st.tuples(one, _mutations(descriptor)).map(b"".join)),
        (1, st.binary(max_size=256)),
    ]
    if seeds:
        kinds.append((3, builder.near(seeds).map(lambda m: m.SerializeToString())))
    return weighted(*kinds)
