"""Prometheus' text format 0.0.4, parsed back strictly, to check what the report module writes."""

import re

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus(text):
    """{name: {type, help, samples: {vm label or None: value}}} of text format 0.0.4, strictly."""
    assert text.endswith("\n")
    families, current = {}, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_text = line[7:].split(" ", 1)
            assert name not in families
            current = families[name] = dict(help=re.sub(r"\\[\\n]", lambda m: UNESCAPE[m.group(0)], help_text),
                                            samples={})
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in families and kind in ("counter", "gauge")
            families[name]["type"] = kind
        else:
            name, labels, value = SAMPLE.match(line).groups()
            assert families[name] is current and "type" in current
            parsed = {}
            rest = labels or ""
            while rest:
                match = LABEL.match(rest)
                parsed[match.group(1)] = re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group(0)], match.group(2))
                rest = rest[match.end():]
            assert set(parsed) <= {"vm"}
            current["samples"][parsed.get("vm")] = float(value)
    return families
