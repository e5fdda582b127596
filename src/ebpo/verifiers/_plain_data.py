# Plain data over a pipe: the only thing a sandboxed program can tell the code verifier's judge.
#
# Read by the judge (``_code_judge.py``) and put in front of the child's text
# (``_code_child.py``), so both sides share one definition. Standard library only.
# JSON with tags for what JSON lacks: {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]},
# {"dict": [[k, v], ...]} (any hashable keys), {"bytes": "hex"}, {"complex": ["re", "im"]}.
# Types are checked exactly, so a subclass of int whose ``__eq__`` always says True, or a
# list subclass, is refused rather than flattened into something that compares equal.


_PLAIN_ATOMS = (type(None), bool, int, float, str)


def _encode(value, depth=0):
    """Plain data only, by exact type (a subclass of int or list is refused, whatever it claims)."""
    kind = type(value)
    if depth > 100:
        raise TypeError("nested too deeply")
    if kind in _PLAIN_ATOMS:
        return value  # JSON carries NaN and infinities too
    if kind is list:
        return [_encode(item, depth + 1) for item in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    raise TypeError(kind.__name__)


def _decode(data, depth=0):
    if depth > 100:
        raise ValueError("nested too deeply")
    kind = type(data)
    if kind in _PLAIN_ATOMS:
        return data
    if kind is list:
        return [_decode(item, depth + 1) for item in data]
    ((tag, body),) = data.items()
    if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](_decode(item, depth + 1) for item in body)
    if tag == "dict":
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in body}
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "complex":
        return complex(float(body[0]), float(body[1]))
    raise ValueError(tag)
