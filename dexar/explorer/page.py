"""``explanation.html``: one self-contained page (HTML + inlined CSS, JS and data) per explained image.

The page's JSON (``#dx-data``) is what ``assets/explorer.js`` reads:

* ``image``: ``{src, width, height}`` (data URI; width/height of the embedded image);
* ``grid_box``: ``[left, top, right, bottom]`` as fractions of the image — where the maps lie;
* ``maps``: the distinct map PNGs (data URIs); everything else refers to maps by index, so a word
  made of one piece stores its map once;
* ``methods``: ``[{name, label, options, sequence, sequence_empty, words: [{text, weight, filler,
  empty, map, pieces: [{text, weight, empty, map}]}]}]``;
* ``colormap``: 256 RGB triples as hex (the PNG overlays' colour map); ``title``, ``prompt``,
  ``answer``, ``sample_id``; ``side_by_side``: open with the methods side by side.

The URL fragment overrides the opening state: ``#side``, ``#pieces``, ``#method=<name>``.

A Content-Security-Policy allows nothing but inline code and ``data:`` images, so the page cannot
reach the network even by mistake.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from dexar.explorer.encode import IMAGE_MAX_SIDE, MAP_MAX_SIDE, colormap_hex, fit, image_uri, map_uri, to_rgb
from dexar.explorer.payload import ExplanationPayload, display_text, image_size


@cache
def asset(name: str) -> str:
    """The text of ``dexar/explorer/assets/<name>``."""
    return resources.files("dexar.explorer").joinpath("assets", name).read_text(encoding="utf-8")


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""What a page may load: nothing but its own inline style, script and ``data:`` images."""

EXPLANATION_BODY = (
    '<main id="dx-app" class="dx" aria-busy="true"><noscript><p class="dx-note">This page draws its maps with '
    "JavaScript: allow scripts for this file to see them.</p></noscript></main>"
)


def shell(title: str, body: str, data_id: str, data: Any, css: str, js: str, csp: str = CSP) -> str:
    """A complete page: ``assets/shell.html`` around ``body``, the JSON ``data`` and the inlined CSS/JS.

    ``js`` is the page's script; :file:`assets/common.js` (shared helpers) is put before it.
    """
    return fill(
        asset("shell.html"),
        csp=csp,
        title=html.escape(title),
        css=css,
        body=body,
        data_id=data_id,
        data=script_json(data),
        js=asset("common.js") + js,
    )


def script_json(value: Any) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>``, ``&`` and line separators are escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def fill(template: str, **parts: str) -> str:
    """Replace each ``{{name}}`` of ``template`` once, in one pass (a part's text is never re-scanned)."""
    pieces = template.split("{{")
    out = [pieces[0]]
    for piece in pieces[1:]:
        name, sep, rest = piece.partition("}}")
        if not sep or name not in parts:
            raise KeyError(f"explorer template: unknown placeholder {{{{{name}}}}}")
        out += [parts[name], rest]
    return "".join(out)


class _Maps:
    """Distinct map PNGs, by index."""

    def __init__(self, max_side: int) -> None:
        self.uris: list[str] = []
        self._index: dict[str, int] = {}
        self.max_side = max_side

    def add(self, values: Any, where: str) -> int:
        uri = map_uri(values, where, self.max_side)
        if uri not in self._index:
            self._index[uri] = len(self.uris)
            self.uris.append(uri)
        return self._index[uri]


def page_data(
    payload: ExplanationPayload, image_max_side: int = IMAGE_MAX_SIDE, map_max_side: int = MAP_MAX_SIDE
) -> dict[str, Any]:
    """The JSON the page reads (see the module docstring); validates the payload first."""
    payload.validate()
    width, height = image_size(payload.image)
    box = payload.grid_box or (0, 0, width, height)
    shown = fit(to_rgb(payload.image), image_max_side)
    maps = _Maps(map_max_side)
    methods = []
    for method in payload.methods:
        where = f"method {method.name!r}"
        words = []
        for i, word in enumerate(method.words):
            at = f"{where}, word {i} ({word.display!r})"
            words.append(
                {
                    "text": word.display,
                    "weight": float(word.weight),
                    "filler": word.filler,
                    "empty": bool(word.empty),
                    "map": maps.add(word.map, f"{at}: map"),
                    "pieces": [
                        {
                            "text": display_text(piece.text),
                            "weight": float(piece.weight),
                            "empty": bool(piece.empty),
                            "map": maps.add(piece.map, f"{at}, piece {j}: map"),
                        }
                        for j, piece in enumerate(word.pieces)
                    ],
                }
            )
        methods.append(
            {
                "name": method.name,
                "label": method.label or method.name,
                "options": {k: _jsonable(v) for k, v in method.options.items()},
                "sequence": maps.add(method.sequence_map, f"{where}: sequence_map"),
                "sequence_empty": bool(method.sequence_empty),
                "words": words,
            }
        )
    return {
        "version": 1,
        "title": payload.title or payload.sample_id or "dexar explanation",
        "prompt": payload.prompt,
        "answer": payload.answer,
        "sample_id": payload.sample_id,
        "image": {"src": image_uri(shown, image_max_side), "width": shown.width, "height": shown.height},
        "grid_box": [box[0] / width, box[1] / height, box[2] / width, box[3] / height],
        "colormap": colormap_hex(),
        "maps": maps.uris,
        "methods": methods,
    }


def render_explanation_html(payload: ExplanationPayload, side_by_side: bool = False, **sizes: int) -> str:
    """The self-contained page of one payload, as a string.

    Args:
        payload: What to show.
        side_by_side: Open with the methods side by side (when there are several).
        **sizes: ``image_max_side``, ``map_max_side`` (see :mod:`dexar.explorer.encode`).
    """
    data = page_data(payload, **sizes)
    data["side_by_side"] = bool(side_by_side)
    return shell(data["title"], EXPLANATION_BODY, "dx-data", data, asset("explorer.css"), asset("explorer.js"))


def write_explanation_html(
    payload: ExplanationPayload, path: str | Path, side_by_side: bool = False, **sizes: int
) -> Path:
    """Write ``payload``'s page to ``path`` (a directory gets ``explanation.html``); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "explanation.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_explanation_html(payload, side_by_side, **sizes), encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    """Options as JSON: plain values pass, anything else becomes its ``repr``."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)
