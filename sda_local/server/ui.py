"""The chat page at ``/``: static files inside the package (ui/), no build step and nothing from another origin.

Served with a strict Content-Security-Policy: scripts, styles and connections from this origin only, no inline
script or style markup, no frames, no form posts. The page renders model text with ``textContent`` only.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/ui/style.css": ("style.css", "text/css; charset=utf-8")}
PUBLIC_PATHS = frozenset(FILES)  # served without the API key: the page asks for it


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


def add_ui_routes(app: FastAPI) -> None:
    contents = {path: (_read(name), media) for path, (name, media) in FILES.items()}
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-cache"}

    for path, (body, media) in contents.items():
        def page(body=body, media=media):
            return Response(body, media_type=media, headers=headers)

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
