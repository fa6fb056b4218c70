"""The manifest's canonical JSON, implemented here a second time from docs/FORMAT.md's byte-by-byte
definition (no ``json.dumps``), must give the same checksum as the package for any JSON value."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.manifest import CHECKSUM_FIELD, content_checksum
from pipeline.store.layout import MANIFEST_NAME

ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def spec_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in ESCAPES:
            out.append(ESCAPES[char])
        elif " " <= char <= "~":
            out.append(char)
        else:
            for unit in np.frombuffer(char.encode("utf-16-le"), dtype="<u2"):
                out.append(f"\\u{int(unit):04x}")
    return "".join(out) + '"'


def spec_float(value: float) -> str:
    assert math.isfinite(value)
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    scientific = np.format_float_scientific(abs(value), unique=True, trim="-")  # shortest round-trip digits
    mantissa, exponent = scientific.split("e")
    digits, power = mantissa.replace(".", ""), int(exponent)
    if value == 0:
        return f"{sign}0.0"
    if -4 <= power < 16:
        if power >= 0:
            whole = (digits + "0" * (power + 1))[: power + 1]
            fraction = digits[power + 1 :] or "0"
        else:
            whole, fraction = "0", "0" * (-power - 1) + digits
        return f"{sign}{whole}.{fraction}"
    rest = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{rest}e{'-' if power < 0 else '+'}{abs(power):02d}"


def spec_canonical(value) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return spec_float(value)
    if isinstance(value, str):
        return spec_string(value)
    if isinstance(value, list):
        return "[" + ",".join(spec_canonical(item) for item in value) + "]"
    members = sorted(value.items(), key=lambda item: [ord(char) for char in item[0]])
    return "{" + ",".join(f"{spec_string(key)}:{spec_canonical(item)}" for key, item in members) + "}"


def spec_checksum(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_FIELD}
    return hashlib.sha256(spec_canonical(body).encode("ascii")).hexdigest()


def test_a_real_manifest_verifies_with_the_specified_canonical_form(train_cache):
    manifest = json.loads((train_cache / MANIFEST_NAME).read_text())
    assert spec_checksum(manifest) == manifest[CHECKSUM_FIELD] == content_checksum(manifest)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_the_specified_canonical_form_matches_the_package_for_any_value(manifest):
    assert spec_checksum(manifest) == content_checksum(manifest)


def test_float_forms_at_the_edges_of_positional_notation():
    for value, text in [
        (1.0, "1.0"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (-0.0, "-0.0"),
        (1.5e300, "1.5e+300"),
        (123.25, "123.25"),
    ]:
        assert spec_float(value) == text == json.dumps(value)
