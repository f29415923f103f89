"""reportlab building blocks for the report: fonts, paragraph styles, page templates, tables and images.

Fonts are the DejaVu faces matplotlib ships (wide Unicode coverage, so odd reconstructed tokens still print);
Helvetica when they are missing.
"""

from __future__ import annotations

import io
from pathlib import Path

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import cm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import BaseDocTemplate, Frame, Image, PageTemplate, Paragraph, Table, TableStyle

from reports.markup import escape

MARGIN = 1.5 * cm
PORTRAIT_W = A4[0] - 2 * MARGIN
LANDSCAPE_W = landscape(A4)[0] - 2 * MARGIN
LEVEL_COLORS = {"most": colors.HexColor("#f4c7c3"), "partial": colors.HexColor("#fce8b2"),
                "little": colors.HexColor("#b7e1cd"), "none": colors.HexColor("#8fd1b0"),
                "unknown": colors.HexColor("#e0e0e0")}
FAILED_BG = colors.HexColor("#fdecea")
HEADER_BG = colors.HexColor("#e8eaf0")


def _fonts() -> tuple[str, str]:
    try:
        import matplotlib

        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        faces = {"DejaVuSans": "DejaVuSans.ttf", "DejaVuSans-Bold": "DejaVuSans-Bold.ttf",
                 "DejaVuSans-Oblique": "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique": "DejaVuSans-BoldOblique.ttf"}
        for name, file in faces.items():
            if name not in pdfmetrics.getRegisteredFontNames():
                pdfmetrics.registerFont(TTFont(name, str(ttf / file)))
        pdfmetrics.registerFontFamily("DejaVuSans", normal="DejaVuSans", bold="DejaVuSans-Bold",
                                      italic="DejaVuSans-Oblique", boldItalic="DejaVuSans-BoldOblique")
        return "DejaVuSans", "DejaVuSans-Bold"
    except Exception:  # no matplotlib fonts: the standard PDF fonts still work (Latin-1 only)
        return "Helvetica", "Helvetica-Bold"


FONT, BOLD = _fonts()
STYLES = {
    "title": ParagraphStyle("title", fontName=BOLD, fontSize=17, leading=21, spaceAfter=4),
    "subtitle": ParagraphStyle("subtitle", fontName=FONT, fontSize=8.5, leading=11, textColor=colors.grey,
                               spaceAfter=8),
    "h1": ParagraphStyle("h1", fontName=BOLD, fontSize=13, leading=16, spaceBefore=8, spaceAfter=5,
                         keepWithNext=1, textColor=colors.HexColor("#1f3864")),
    "h2": ParagraphStyle("h2", fontName=BOLD, fontSize=10, leading=13, spaceBefore=7, spaceAfter=3, keepWithNext=1),
    "h2free": ParagraphStyle("h2free", fontName=BOLD, fontSize=10, leading=13, spaceBefore=7, spaceAfter=3),
    "body": ParagraphStyle("body", fontName=FONT, fontSize=9, leading=12, spaceAfter=4),
    "verdict": ParagraphStyle("verdict", fontName=FONT, fontSize=9, leading=12, spaceAfter=5, leftIndent=8),
    "caption": ParagraphStyle("caption", fontName=FONT, fontSize=8, leading=10, textColor=colors.HexColor("#444444"),
                              spaceBefore=2, spaceAfter=8),
    "cell": ParagraphStyle("cell", fontName=FONT, fontSize=7, leading=8.6),
    "cellr": ParagraphStyle("cellr", fontName=FONT, fontSize=7, leading=8.6, alignment=2),
    "head": ParagraphStyle("head", fontName=BOLD, fontSize=7, leading=8.6),
    "sample": ParagraphStyle("sample", fontName=FONT, fontSize=8, leading=10.5),
}


def para(text: str, style: str = "body") -> Paragraph:
    """A paragraph from *markup* (escape untrusted text first: ``markup.escape``)."""
    return Paragraph(text, STYLES[style])


def text(value: object, style: str = "cell") -> Paragraph:
    """A paragraph from *plain* text (escaped here)."""
    return Paragraph(escape(value), STYLES[style])


def table(rows: list[list], widths: list[float], extra: list[tuple] | None = None, header: bool = True) -> Table:
    """A grid table whose cells are Paragraphs (so long text wraps), header row repeated on each page."""
    t = Table(rows, colWidths=widths, repeatRows=1 if header else 0)
    style = [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#b0b0b0")),
        ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), HEADER_BG))
    t.setStyle(TableStyle(style + (extra or [])))
    return t


def image(png: bytes, width: float, max_height: float) -> Image:
    """A PNG scaled to ``width`` (or less, to stay under ``max_height``), keeping its aspect ratio."""
    w, h = ImageReader(io.BytesIO(png)).getSize()
    scale = min(width / w, max_height / h)
    return Image(io.BytesIO(png), width=w * scale, height=h * scale)


def document(path: Path, title: str, footer: str) -> BaseDocTemplate:
    """A document with a 'portrait' and a 'landscape' A4 page template (switch with NextPageTemplate)."""

    def on_page(canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont(FONT, 7)
        canvas.setFillColor(colors.grey)
        w, _ = canvas._pagesize
        canvas.drawString(MARGIN, 0.8 * cm, footer)
        canvas.drawRightString(w - MARGIN, 0.8 * cm, f"page {doc.page}")
        canvas.restoreState()

    doc = BaseDocTemplate(str(path), pagesize=A4, title=title, author="splitleak", leftMargin=MARGIN,
                          rightMargin=MARGIN, topMargin=MARGIN, bottomMargin=MARGIN)
    templates = []
    for name, size in (("portrait", A4), ("landscape", landscape(A4))):
        frame = Frame(MARGIN, MARGIN, size[0] - 2 * MARGIN, size[1] - 2 * MARGIN, id=name, leftPadding=0,
                      rightPadding=0, topPadding=0, bottomPadding=0)
        templates.append(PageTemplate(id=name, frames=[frame], pagesize=size, onPage=on_page))
    doc.addPageTemplates(templates)
    return doc
