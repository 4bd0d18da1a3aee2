"""The service's error answers: always ``{"error": {"code", "message", "field"?, "limit"?, "hint"?}}``.

* ``code``: one per cause, the same in every form of request (multipart, JSON, batch);
* ``message``: a sentence a person can act on ("... is not an image file. Send a JPEG,
  PNG, ... or leave it out."), with sizes in readable units; the page shows it as is;
* ``field``: the part of the request that is wrong, in the request's own terms (``text``,
  ``images[1]``, ``posts[3].images[0]``, ``body``); ``limit``: the limit exceeded, exact;
* ``hint``: for whoever runs the server or writes the client (the server flag that sets
  the limit, the ``on_bad_image`` option).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 limit: Any = None, headers: dict[str, str] | None = None, details: list | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.limit, self.headers, self.details, self.hint = field, limit, headers, details, hint

    def body(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        if self.limit is not None:
            err["limit"] = self.limit
        if self.hint:
            err["hint"] = self.hint
        if self.details:
            err["details"] = self.details
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def human_bytes(n: int) -> str:
    """``16777216`` -> ``16 MiB``; ``1536`` -> ``1.5 KiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return f"{n} bytes"


def too_large(field: str, what: str, got: int, limit: int, flag: str, where: str | None = None) -> ApiError:
    """413 ``<what>_too_large`` for a size in bytes (``what``: "body size" or "image size")."""
    subject = where or ("The request" if field == "body" else field)
    tail = "per image" if what == "image size" else "per request"
    todo = "Send a smaller file." if what == "image size" else "Send fewer or smaller images."
    return ApiError(413, f"{what.replace(' ', '_')}_too_large",
                    f"{subject} is {human_bytes(got)}; the limit is {human_bytes(limit)} {tail}. {todo}",
                    field=field, limit=limit, hint=f"server flag {flag}")


def loc_to_field(loc) -> str:
    """``("body", "posts", 3, "images", 0)`` -> ``posts[3].images[0]``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


_KIND = {"missing": "missing_field", "extra_forbidden": "unknown_field", "json_invalid": "malformed_json",
         "json_type": "malformed_json", "finite_number": "invalid_value"}


def _code(kind: str) -> str:
    if kind in _KIND:
        return _KIND[kind]
    return "wrong_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"


def from_validation(errors: list[dict]) -> ApiError:
    """Pydantic / FastAPI validation errors -> one ApiError naming the first bad field."""
    details = [{"field": loc_to_field(e.get("loc", ())), "code": _code(e.get("type", "invalid")),
                "message": e.get("msg", "")} for e in errors]
    first = details[0] if details else {"field": "body", "code": "invalid_value", "message": "invalid request"}
    kind = errors[0].get("type", "") if errors else ""
    if first["code"] == "malformed_json":
        ctx = errors[0].get("ctx", {}) if errors else {}
        msg = f"The body is not valid JSON ({ctx.get('error', first['message'])}). Send a JSON object."
        return ApiError(400, "malformed_json", msg, field="body")
    f = first["field"]
    if first["code"] == "missing_field":
        msg = f"{f} is required" + (" (it may be empty)." if f.endswith("text") else ".")
    elif first["code"] == "unknown_field":
        msg = f"{f} is not a field of this request; check its spelling."
    elif kind == "finite_number":
        msg = f"{f} is NaN or infinite; feature vectors must hold finite numbers."
    elif first["code"] == "wrong_type":
        msg = f"{f} has the wrong type ({first['message']})."
    else:
        msg = f"{f}: {first['message']}."
    return ApiError(422, first["code"], msg, field=f, details=details[:10] if len(details) > 1 else None)
