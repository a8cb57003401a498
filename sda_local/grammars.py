"""GBNF grammars for OpenAI's ``response_format``: any JSON object, or JSON that follows a schema.

The sampler applies the grammar after the fusion (engine/sampling.py), so an SDA answer is steered and
valid JSON at once. Whitespace is bounded, as in llama.cpp's ``grammars/json.gbnf`` (a small model left
free to emit whitespace can fill its whole context with it), and so are depth, items and string length.
"""

from __future__ import annotations

import json
from typing import Optional

from .errors import InputError

# Bounds that keep a small model's JSON finite: a model that starts repeating keys (seen on the default model)
# would otherwise fill its whole context inside one object. Any JSON within them is accepted.
JSON_MAX_DEPTH = 4  # nested objects/arrays, the top object included
JSON_MAX_ITEMS = 16  # members of an object, items of an array
JSON_MAX_STRING = 128  # characters of a string


def _json_object_grammar() -> str:
    rules = ["root ::= obj1"]
    for level in range(1, JSON_MAX_DEPTH + 1):
        inner = f"val{level + 1}"
        more = JSON_MAX_ITEMS - 1
        rules.append(f'obj{level} ::= "{{" ws ( string ":" ws {inner} ("," ws string ":" ws {inner}){{0,{more}}} )? "}}" ws')
        rules.append(f'arr{level} ::= "[" ws ( {inner} ("," ws {inner}){{0,{more}}} )? "]" ws')
        rules.append(f"val{level} ::= obj{level} | arr{level} | scalar")
    rules.append(f"val{JSON_MAX_DEPTH + 1} ::= scalar")
    rules += [
        'scalar ::= string | number | ("true" | "false" | "null") ws',
        f'string ::= "\\"" char{{0,{JSON_MAX_STRING}}} "\\"" ws',
        'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
        'number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? ws',
        'ws ::= | " " | "\\n" [ \\t]{0,20}',
    ]
    return "\n".join(rules) + "\n"


JSON_OBJECT = _json_object_grammar()


def json_schema_grammar(schema: dict) -> str:
    """The GBNF of ``schema`` (llama.cpp's converter, as llama-cpp-python ships it)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter asserts on what it does not support (e.g. unanchored patterns)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"the JSON schema of response_format cannot be turned into a grammar: {detail}") from None


def grammar_for(response_format) -> Optional[str]:
    """The grammar of a request's ``response_format`` (schemas.ResponseFormat or None); None: free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        # llama-server's extension: {"type": "json_object", "schema": {...}} constrains to that schema
        return json_schema_grammar(response_format.schema_) if response_format.schema_ else JSON_OBJECT
    return json_schema_grammar(response_format.json_schema["schema"])
