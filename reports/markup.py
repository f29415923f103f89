"""Untrusted text (reconstructions, references, errors) made safe for reportlab ``Paragraph`` markup, with
PII values highlighted. Everything that is not our own tag goes through ``escape``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from xml.sax.saxutils import escape as _xml_escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffe\uffff]")
_SPACES = re.compile(r"[\t\n\r]+")

RECOVERED = '<font backColor="#ffd6d6" color="#a00000"><b>{}</b></font>'  # the attacker got this PII value
MISSED = '<u>{}</u>'  # a PII value the attacker did not recover (original text only)


def escape(text: object) -> str:
    """Plain text as Paragraph markup: XML-escaped, control characters dropped, newlines as spaces."""
    s = "" if text is None else str(text)
    s = _CONTROL.sub("", _SPACES.sub(" ", s))
    return _xml_escape(s, {'"': "&quot;"})


def highlight(text: object, spans: Iterable[tuple[str, str]]) -> str:
    """``text`` as markup, each occurrence of a span's value wrapped in its template (``RECOVERED`` or
    ``MISSED``). Longer values win where values overlap; values are matched verbatim (case-sensitive)."""
    s = "" if text is None else str(text)
    spans = sorted(((v, t) for v, t in spans if v), key=lambda vt: -len(vt[0]))
    marks: list[tuple[int, int, str]] = []
    for value, template in spans:
        start = 0
        while (i := s.find(value, start)) >= 0:
            end = i + len(value)
            if not any(i < e and b < end for b, e, _ in marks):
                marks.append((i, end, template))
            start = i + 1
    out, pos = [], 0
    for b, e, template in sorted(marks):
        out.append(escape(s[pos:b]))
        out.append(template.format(escape(s[b:e])))
        pos = e
    out.append(escape(s[pos:]))
    return "".join(out)


def sample_markup(sample: dict) -> tuple[str, str]:
    """(original, reconstruction) markup for one stored sample: recovered PII highlighted in both, PII the
    attacker missed underlined in the original."""
    pii = sample.get("pii") or {}
    recovered, missed = [], []
    for entry in pii.values():
        if isinstance(entry, list | tuple) and entry:
            value, hit = str(entry[0]), bool(entry[1]) if len(entry) > 1 else False
        else:
            value, hit = str(entry), False
        (recovered if hit else missed).append(value)
    ref = highlight(sample.get("reference"), [(v, RECOVERED) for v in recovered] + [(v, MISSED) for v in missed])
    hyp = highlight(sample.get("reconstruction"), [(v, RECOVERED) for v in recovered])
    return ref, hyp
