"""The service's error answers: always ``{"error": {"code", "message", "field"?, "limit"?}}``.

``field`` names the part of the request that is wrong, in the request's own terms
(``text``, ``images[1]``, ``posts[3].images[0]``, ``body``); ``limit`` is the limit that
was exceeded, when one was.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 limit: Any = None, headers: dict[str, str] | None = None, details: list | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.limit, self.headers, self.details = field, limit, headers, details

    def body(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        if self.limit is not None:
            err["limit"] = self.limit
        if self.details:
            err["details"] = self.details
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def too_large(field: str, what: str, got: int, limit: int, flag: str) -> ApiError:
    return ApiError(413, f"{what.replace(' ', '_')}_too_large",
                    f"{field}: {what} {got} is over the limit of {limit} (server flag {flag})",
                    field=field, limit=limit)


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
         "json_type": "malformed_json"}


def from_validation(errors: list[dict]) -> ApiError:
    """Pydantic / FastAPI validation errors -> one ApiError naming the first bad field."""
    details = []
    for e in errors:
        kind = e.get("type", "invalid")
        details.append({"field": loc_to_field(e.get("loc", ())), "code": _KIND.get(kind, "wrong_type"
                        if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"),
                        "message": e.get("msg", "")})
    first = details[0] if details else {"field": "body", "code": "invalid_value", "message": "invalid request"}
    if first["code"] == "malformed_json":
        ctx = errors[0].get("ctx", {}) if errors else {}
        msg = f"the body is not valid JSON: {ctx.get('error', first['message'])}"
        return ApiError(400, "malformed_json", msg, field="body")
    if first["code"] == "missing_field":
        msg = f"{first['field']}: this field is required"
    elif first["code"] == "unknown_field":
        msg = f"{first['field']}: unknown field"
    elif first["code"] == "wrong_type":
        msg = f"{first['field']}: wrong type ({first['message']})"
    else:
        msg = f"{first['field']}: {first['message']}"
    return ApiError(422, first["code"], msg, field=first["field"], details=details if len(details) > 1 else None)
