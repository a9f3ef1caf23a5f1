"""The OpenAPI 3.1 document of the collector's HTTP interface, served at GET /openapi.json.

Built from a dict here rather than kept as a JSON file so the shared parts (the error shape, the
common answers) are written once. Two tests keep it true: one compares its paths and methods
with the app's router both ways, one checks real answers of every endpoint against it; and a
schemathesis run generates requests from it and checks every answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

import stats
from filters import MAX_DOMAIN_LENGTH, PER_DOMAIN_REASONS, DropReason
from pathways import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_PROPS,
    MAX_PATH_LENGTH,
    MAX_PROP_KEY_LENGTH,
    MAX_PROP_VALUE_LENGTH,
    MAX_UTM_LENGTH,
    UTM_KEYS,
)

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def error(description: str, headers: dict[str, Any] | None = None) -> Schema:
    """An answer in the one error shape."""
    answer: Schema = {"description": description, "content": {JSON: {"schema": ref("Error")}}}
    if headers:
        answer["headers"] = headers
    return answer


def json_answer(description: str, schema: Schema, headers: dict[str, Any] | None = None) -> Schema:
    answer: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def header(description: str, required: bool = False, schema: Schema | None = None) -> Schema:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


INTERNAL = error("An unexpected error; the body never carries internal detail.")
RETRY_AFTER = {"Retry-After": header("Seconds to wait.", False, {"type": "string", "pattern": "^[0-9]+$"})}
UNAVAILABLE = error("The collector is shutting down, or cannot write to its database (its disk is full or failing: "
                    "then with Retry-After); try again.", RETRY_AFTER)
READERS_BUSY = error("The collector is shutting down, or too many statistics requests are waiting (then with "
                     "Retry-After: 1); try again.", RETRY_AFTER)
NOT_FOUND = error("No such endpoint (also answered for any path not listed here).")
READER_ERRORS = {
    "400": error("A parameter is unknown, repeated, missing or malformed; the message names it."),
    "401": error(
        "STATS_TOKEN is set and the request lacks 'Authorization: Bearer <token>' or has a wrong one.",
        {"WWW-Authenticate": header("Bearer realm=\"statistics\"", required=True)},
    ),
    "403": error("STATS_TOKEN is not set, and the request did not come from a loopback socket without any "
                 "forwarding header (X-Forwarded-For, X-Real-IP, CF-Connecting-IP, Forwarded)."),
    "500": INTERNAL,
    "503": READERS_BUSY,
}
DOMAIN_PARAM = {
    "name": "domain", "in": "query", "required": True,
    "description": "The site, e.g. example.com; `(no site)` for received events whose domain was empty or not a "
    "hostname.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_DOMAIN_LENGTH},
}
DAY = {"type": "string", "description": "A day, YYYY-MM-DD."}
READER_SECURITY: list[dict[str, list[str]]] = [{"statsToken": []}, {}]


def figure() -> Schema:
    number = {"type": ["number", "null"]}
    return {
        "type": "object",
        "required": ["label", "value", "previous", "change"],
        "properties": {"label": {"type": "string"}, "value": number, "previous": number, "change": number},
    }


def ranked(column: str, description: str = "", nullable: bool = False, extra: Schema | None = None) -> Schema:
    """A list of /api/stats: rows of a value with its page views and visitors, by visitors."""
    properties = {column: {"type": ["string", "null"] if nullable else "string"}, "pageviews": {"type": "integer"},
                  "visitors": {"type": "integer"}, **(extra or {})}
    listed: Schema = {
        "type": "array",
        "items": {"type": "object", "required": list(properties), "properties": properties},
    }
    if description:
        listed["description"] = description
    return listed


UNKNOWN_IS_NULL = " null when unknown (a visitor.tracked.v0 page view, or one whose {what} could not be told)."
BREAKDOWN_SCHEMAS: dict[str, Schema] = {
    "countries": ranked("country", "Page views and visitors by the visitor's country (ISO 3166-1 alpha-2);"
                        + UNKNOWN_IS_NULL.format(what="country"), nullable=True),
    "browsers": ranked("browser", "By browser (a name, no version);" + UNKNOWN_IS_NULL.format(what="browser"),
                       nullable=True),
    "os": ranked("os", "By operating system (a name, no version);" + UNKNOWN_IS_NULL.format(what="system"),
                 nullable=True),
    "devices": ranked("device", "By device class: desktop, mobile or tablet;" + UNKNOWN_IS_NULL.format(what="class"),
                      nullable=True),
    **{f"utm_{part}s": ranked(f"utm_{part}", f"By the utm_{part} of the visit (its first page view's); null for "
                              f"visits without one.", nullable=True) for part in ("source", "medium", "campaign")},
    "entry_pages": ranked("pathname", "By the page a visit began on: its visits, their bounce rate (%, null "
                          "without visits), and the page views of those visits; null for visits counted before entry "
                          "pages were kept.", nullable=True, extra={
                              "visits": {"type": "integer"}, "bounce_rate": {"type": ["number", "null"]}}),
    "exit_pages": ranked("pathname", "By the page a visit ended on (so far): its visits, and their page views, "
                         "counted on the day each visit began.", nullable=True,
                         extra={"visits": {"type": "integer"}}),
}


def event_figures(extra: dict[str, Schema] | None = None) -> Schema:
    """A custom event's figures over the period."""
    properties: dict[str, Schema] = {
        "name": {"type": "string", "description": "The event name; (other) holds the names beyond "
                 "EVENT_NAMES_PER_DAY on a site and day."},
        "count": {"type": "integer", "minimum": 0, "description": "Events."},
        "visitors": {"type": "integer", "minimum": 0,
                     "description": "Unique visitors with the event, summed over days."},
        "conversion_rate": {"type": ["number", "null"], "minimum": 0, "description": (
            "visitors in percent of the period's visitors (totals.visitors), one decimal; null when the "
            "period had none. Above 100 only if events came from visitors with no page view counted that day.")},
        **(extra or {}),
    }
    return {"type": "object", "required": list(properties), "properties": properties}


EVENT_PROPERTIES: Schema = {
    "type": "array",
    "description": "Each property the event carried, by events; a property's values by events, at most `limit` "
    "of them. (other) holds the values beyond EVENT_PROPERTY_VALUES_PER_DAY on a site and day (and, as the "
    "property, properties first seen after it).",
    "items": {
        "type": "object",
        "required": ["name", "count", "values"],
        "properties": {
            "name": {"type": "string"},
            "count": {"type": "integer", "minimum": 0, "description": "Events that carried the property."},
            "values": {"type": "array", "items": {
                "type": "object", "required": ["value", "count"],
                "properties": {"value": {"type": "string", "description": "A string as sent; a number or "
                                         "boolean as JSON writes it."},
                               "count": {"type": "integer", "minimum": 0}},
            }},
        },
    },
}


SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "description": "Every error answer of the app has this shape, and nothing more.",
        "required": ["status", "error"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "integer", "minimum": 400, "maximum": 599, "description": "The HTTP status."},
            "error": {"type": "string", "minLength": 1, "description": "What is wrong, naming the field."},
        },
    },
    "Pageview": {
        "type": "object",
        "required": ["pathname", "referrer"],
        "additionalProperties": False,
        "properties": {
            "pathname": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_LENGTH},
            "referrer": {"type": "string", "maxLength": MAX_PATH_LENGTH},
            "domain": {"type": "string", "minLength": 1, "maxLength": MAX_DOMAIN_LENGTH,
                       "description": "A hostname; when absent, the host of Origin, else of Referer."},
            "utm": {
                "type": "object",
                "description": "The page's campaign parameters, as the tracker reads them from its query string "
                "(utm_source, with ref and source as its aliases; utm_medium, utm_campaign, utm_term, utm_content). "
                "Each key is optional; they go into the visitor.tracked.v1 event (not into v0's).",
                "additionalProperties": False,
                "properties": {key: {"type": "string", "minLength": 1, "maxLength": MAX_UTM_LENGTH}
                               for key in UTM_KEYS},
            },
        },
    },
    "Event": {
        "type": "object",
        "required": ["name", "pathname"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": MAX_EVENT_NAME_LENGTH,
                     "description": "What happened, e.g. Signup, 404, Outbound Link: Click."},
            "pathname": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_LENGTH,
                         "description": "Where it happened."},
            "referrer": {"type": "string", "maxLength": MAX_PATH_LENGTH, "description": "Empty when absent."},
            "domain": {"type": "string", "minLength": 1, "maxLength": MAX_DOMAIN_LENGTH,
                       "description": "A hostname; when absent, the host of Origin, else of Referer."},
            "props": {
                "type": "object",
                "description": f"At most {MAX_EVENT_PROPS} properties; keys of 1 to {MAX_PROP_KEY_LENGTH} "
                f"characters; values strings of at most {MAX_PROP_VALUE_LENGTH} characters, finite numbers "
                "(integers within ±(2^53-1)) or booleans; nothing nested.",
                "maxProperties": MAX_EVENT_PROPS,
                "propertyNames": {"minLength": 1, "maxLength": MAX_PROP_KEY_LENGTH},
                "additionalProperties": {"anyOf": [
                    {"type": "string", "maxLength": MAX_PROP_VALUE_LENGTH},
                    {"type": "number"},
                    {"type": "boolean"},
                ]},
            },
        },
    },
    "Envelope": {
        "type": "object",
        "description": "A Flowcore event envelope; `aggregator` is the legacy name of `flowType`.",
        "required": ["eventId", "eventType", "validTime", "payload"],
        "properties": {
            "eventId": {"type": "string", "minLength": 1},
            "flowType": {"type": "string", "minLength": 1},
            "aggregator": {"type": "string", "minLength": 1},
            "eventType": {"type": "string", "minLength": 1},
            "validTime": {"type": "string", "description": "ISO 8601 with a zone."},
            "timeBucket": {"type": "string"},
            "payload": {"type": "object"},
            "metadata": {"type": "object"},
        },
    },
    "Index": {
        "type": "object",
        "required": ["service", "version", "mode", "endpoints"],
        "properties": {
            "service": {"type": "string"}, "version": {"type": "string"}, "mode": {"enum": ["local", "flowcore"]},
            "endpoints": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "mode", "version", "database"],
        "properties": {
            "status": {"enum": ["ok", "halted", "unavailable"]},
            "mode": {"enum": ["local", "flowcore"]},
            "version": {"type": "string"},
            "database": {"enum": ["ok", "unavailable", "not writable"]},
            "write_error": {"type": "string", "description": "While writes fail: what SQLite said."},
            "write_error_since": {"type": "string"},
            "failed_writes": {"type": "integer", "minimum": 0},
            "backlog": {"type": "integer"},
            "lag_seconds": {"type": "number", "minimum": 0, "description": (
                "How far the read model is behind: the age of the oldest event accepted and not yet counted "
                "(local mode) or not yet sent (Flowcore mode).")},
            "outbox": {"type": "integer"},
            "dead_letters": {"type": "integer"},
            "last_processed_at": {"type": ["string", "null"]},
            "group_commit": {"type": "object"},
            "retention_last_run": {"type": ["string", "null"]},
            "sites": {"type": "object", "description": "Sites counted, MAX_SITES, whether it is reached."},
            "statistics": {"type": "object", "description": "Statistics connections: how many, busy, waiting."},
            "flowcore": {"type": "object"},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["domain", "period", "from", "to", "previous", "timezone", "interval", "totals", "series",
                     "pages", "sources", *BREAKDOWN_SCHEMAS, "filters", "filtered_from", "current_visitors",
                     "events"],
        "properties": {
            "domain": {"type": "string"},
            "period": {"type": "string"},
            "from": DAY,
            "to": DAY,
            "previous": {"type": "object", "required": ["from", "to"], "properties": {"from": DAY, "to": DAY}},
            "timezone": {"type": "string"},
            "interval": {"enum": ["hour", "day"]},
            "totals": {
                "type": "object",
                "required": ["pageviews", "visitors", "visits", "bounce_rate", "visit_duration", "views_per_visit"],
                "additionalProperties": figure(),
            },
            "series": {
                "type": "array",
                "items": {"type": "object", "required": ["time", "pageviews", "visitors"],
                          "properties": {"time": {"type": "string"}, "pageviews": {"type": "integer"},
                                         "visitors": {"type": "integer"}}},
            },
            "pages": ranked("pathname"),
            "sources": ranked("source"),
            **BREAKDOWN_SCHEMAS,
            "filters": {
                "type": "array",
                "description": "The filters applied, as given (an empty value, unknown, is null).",
                "items": {"type": "object", "required": ["dimension", "value"], "properties": {
                    "dimension": {"enum": list(stats.FILTER_DIMENSIONS)}, "value": {"type": ["string", "null"]}}},
            },
            "filtered_from": {
                "type": ["string", "null"],
                "description": "With filters, the numbers come from the raw page view rows, kept RAW_RETENTION_DAYS: "
                "the first day they cover when the period (or the previous one) reaches back before it; else null.",
            },
            "current_visitors": {"type": "integer", "minimum": 0},
            "dropped": {
                **ref("Dropped"),
                "description": "Page views not counted in the period: `total` and `by_reason` for this domain "
                f"({', '.join(PER_DOMAIN_REASONS)}); `domain_not_allowed` and `site_limit`: "
                "page views the whole collector dropped for a domain outside ALLOWED_DOMAINS, or for a new "
                "domain beyond MAX_SITES (kept under no name).",
            },
            "events": {"type": "array", "items": event_figures(),
                       "description": "Custom events of the period, by visitors, then events; at most `limit`. With "
                       "filters, the events of the visitors with a matching page view, on the days they had one."},
            "event": {**event_figures({"properties": {**EVENT_PROPERTIES, "type": ["array", "null"]}}),
                      "description": "With ?event=: that event's figures (zeros if it was not seen) and properties; "
                      "with filters, the figures of the matching visitors and `properties` null (the raw event rows "
                      "keep no properties)."},
        },
    },
    "Dropped": {
        "type": "object",
        "required": ["total", "by_reason", "domain_not_allowed", "site_limit"],
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "by_reason": {"type": "object", "required": list(PER_DOMAIN_REASONS),
                          "additionalProperties": {"type": "integer", "minimum": 0}},
            "domain_not_allowed": {"type": "integer", "minimum": 0},
            "site_limit": {"type": "integer", "minimum": 0},
        },
    },
    "Sites": {
        "type": "object",
        "required": ["sites", "next"],
        "properties": {
            "sites": {"type": "array", "items": {
                "type": "object", "required": ["domain", "first_day", "last_day", "pageviews"],
                "properties": {"domain": {"type": "string"}, "first_day": DAY, "last_day": DAY,
                               "pageviews": {"type": "integer"}},
            }},
            "next": {"type": ["string", "null"], "description": "The `after` of the next page; null on the last."},
        },
    },
    "CurrentVisitors": {
        "type": "object",
        "required": ["domain", "current_visitors"],
        "properties": {"domain": {"type": "string"}, "current_visitors": {"type": "integer", "minimum": 0}},
    },
}

CORS_ORIGIN = header("The request's Origin, when it is allowed (ALLOWED_ORIGINS).")
BODY_ERRORS = {
    "400": error("The body is not JSON, not an object, or a field is missing or malformed; the message names it."),
    "408": error("The body did not arrive within BODY_TIMEOUT_MS; the connection is closed."),
    "413": error("The body is larger than the endpoint takes."),
}


def collection_operation(summary: str, description: str, schema: str, what: str, limit: str) -> Schema:
    """POST /api/pageview and POST /api/event: the same rules, the same answers."""
    body = {"schema": ref(schema)}
    return {
        "summary": summary,
        "description": description,
        "requestBody": {"required": True, "content": {JSON: body, "text/plain": body}},
        "responses": {
            "204": {
                "description": "Counted, or dropped and not counted (then X-Collector-Dropped says why).",
                "headers": {
                    "X-Collector-Dropped": header(f"Why the {what} was not counted.",
                                                  schema={"enum": [str(reason) for reason in DropReason]}),
                    "Access-Control-Allow-Origin": CORS_ORIGIN,
                },
            },
            **BODY_ERRORS,
            "413": error(f"The body is larger than {limit}."),
            "415": error("Content-Type is neither application/json nor text/plain."),
            "429": error("This address sent more page views and events than the rate limit allows.",
                         {"Retry-After": header("Seconds to wait.", True, {"type": "string", "pattern": "^[0-9]+$"})}),
            "500": INTERNAL,
            "503": UNAVAILABLE,
        },
    }


def pageview_operation() -> Schema:
    return collection_operation(
        "Record a page view.",
        "Sent by the tracker script, cross-origin. The visitor is hashed from the address and "
        "user agent; with EVENT_VERSION=v1 (the default) the country (from the address, or a trusted proxy's "
        "CF-IPCountry), the browser, the operating system and the device class (desktop, mobile or tablet; "
        "names without versions) are derived from them too. Neither the address nor the user agent is stored.",
        "Pageview", "page view", "8 KiB")


def event_operation() -> Schema:
    return collection_operation(
        "Record a custom event (visitor.event.v0).",
        "Sent by the tracker script (collector.event, data-collector-event, outbound links, file downloads), "
        "cross-origin, under the page view's rules: hashing, filters, rate limit (shared with page views).",
        "Event", "event", "16 KiB")


def preflight() -> Schema:
    return {"summary": "CORS preflight.", "responses": {
        "204": {"description": "The methods and headers allowed.", "headers": {
            "Access-Control-Allow-Methods": header("POST, OPTIONS", True)}},
        "500": INTERNAL}}


def transformer_operation() -> Schema:
    return {
        "summary": "Flowcore delivers an event.",
        "description": "Enabled by FLOWCORE_TRANSFORMER_SECRET. Takes visitor.v0/visitor.tracked.v0 and "
        "visitor.v0/visitor.tracked.v1 events. A redelivered event changes nothing.",
        "security": [{"transformerSecret": []}],
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("Envelope")}}},
        "responses": {
            "200": {"description": "Processed, now or before.", "content": {"text/plain": {"schema": {"const": "OK"}}}},
            **BODY_ERRORS,
            "401": error("X-Secret is missing or wrong."),
            "404": error("The endpoint is disabled, or no pathway handles the event's flow and event type."),
            "413": error("The body is larger than 256 KiB."),
            "422": error("The payload breaks the event type's contract (read as leniently as the original "
                         "collector wrote it), or its validTime or salt day is before 2000 or after tomorrow."),
            "500": INTERNAL,
            "503": error("The handler kept failing: the event is kept in the dead letters; deliver it again "
                         "after Retry-After seconds. Or the collector cannot write to its database (its disk is "
                         "full or failing; nothing was kept, no attempt counted), or is shutting down.",
                         {"Retry-After": header("Seconds to wait before delivering the event again.")}),
        },
    }


def reader(summary: str, parameters: list[Schema], ok: Schema) -> Schema:
    return {"summary": summary, "security": READER_SECURITY, "parameters": parameters,
            "responses": {"200": ok, **READER_ERRORS}}


def query(name: str, description: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def html(summary: str, errors: dict[str, Schema] | None = None) -> Schema:
    return {"summary": summary, "responses": {
        "200": {"description": "The page; its Content-Security-Policy allows exactly what it needs.",
                "content": {"text/html": {"schema": {"type": "string"}}},
                "headers": {"Content-Security-Policy": header("The page's policy.", True)}},
        **(errors or {}),
        "500": INTERNAL,
    }}


def script(summary: str) -> Schema:
    return {"summary": summary, "responses": {
        "200": {"description": "The script (gzip when accepted).",
                "content": {"application/javascript": {"schema": {"type": "string"}}},
                "headers": {"ETag": header("Its version.", True)}},
        "304": {"description": "Not modified (If-None-Match)."},
        "500": INTERNAL}}


def paths() -> dict[str, Any]:
    period = query("period", "The period; custom needs from and to.", {"enum": [
        "today", "yesterday", "7d", "30d", "month", "12mo", "custom"]})
    return {
        "/api/pageview": {"post": pageview_operation(), "options": preflight()},
        "/api/event": {"post": event_operation(), "options": preflight()},
        "/api/transformer": {"post": transformer_operation()},
        "/health": {"get": {"summary": "Status, mode, version, backlog, dead letters.", "responses": {
            "200": json_answer("The collector works.", ref("Health")),
            "503": json_answer("The database does not answer, or writes fail (then `write_error` says why, with "
                               "Retry-After).", ref("Health"), RETRY_AFTER),
            "500": INTERNAL}}},
        "/": {"get": {"summary": "The service and its endpoints.", "responses": {
            "200": json_answer("Name, version, mode and endpoints.", ref("Index")), "500": INTERNAL}}},
        "/script.js": {"get": script("The tracker script.")},
        "/script.clicks.js": {"get": script("The tracker script and its click tracking, in one file.")},
        "/test.html": {"get": html("A test page that sends page views to this collector.")},
        "/dashboard": {"get": html("The statistics dashboard.")},
        "/swagger": {"get": html("Swagger UI over this document (with the swagger extra installed).",
                                 {"404": error("Swagger UI is not installed here (pip install '.[swagger]').")})},
        "/swagger/{asset}": {"get": {
            "summary": "A file of Swagger UI, or its set-up.",
            "parameters": [{"name": "asset", "in": "path", "required": True,
                            "schema": {"enum": [*SWAGGER_ASSETS, "init.js"]}}],
            "responses": {
                "200": {"description": "The file.", "content": {"text/javascript": {"schema": {"type": "string"}},
                                                                 "text/css": {"schema": {"type": "string"}}}},
                "404": error("No such file, or Swagger UI is not installed here."),
                "500": INTERNAL,
            }}},
        "/api/stats": {"get": reader("Statistics of a domain over a period.", [
            DOMAIN_PARAM, period,
            query("from", "First day, YYYY-MM-DD (custom).", DAY),
            query("to", "Last day, YYYY-MM-DD (custom).", DAY),
            query("limit", "Rows of each list, and values of each event property, 1 to 1000.",
                  {"type": "string", "pattern": "^[0-9]+$"}),
            {**query("filter", "`<dimension>:<value>`, as often as needed: every number then counts only the page "
                     "views (and the visits whose first page view) match every filter, from the raw rows "
                     f"(see filtered_from). Dimensions: {', '.join(stats.FILTER_DIMENSIONS)}. An empty value "
                     "matches unknown (null in the lists); a value never seen matches nothing. At most "
                     f"{stats.MAX_FILTERS}, values of at most {stats.MAX_FILTER_VALUE_LENGTH} characters.",
                     {"type": "array", "maxItems": stats.MAX_FILTERS, "items": {
                         "type": "string", "pattern": f"^({'|'.join(stats.FILTER_DIMENSIONS)}):"}}),
             "style": "form", "explode": True},
            query("event", "A custom event's name: the answer gains `event`, its figures and properties.",
                  {"type": "string", "minLength": 1, "maxLength": MAX_EVENT_NAME_LENGTH}),
        ], json_answer("The statistics.", ref("Stats")))},
        "/api/sites": {"get": reader("The domains seen, a page at a time, in domain order.", [
            query("limit", "Sites per page, 1 to 1000 (100).", {"type": "string", "pattern": "^[0-9]+$"}),
            query("after", "The previous page's `next`.", {"type": "string", "maxLength": MAX_DOMAIN_LENGTH}),
            query("search", "Only domains that contain this text.", {"type": "string", "maxLength": MAX_DOMAIN_LENGTH}),
        ], json_answer("A page of sites.", ref("Sites")))},
        "/api/dropped": {"get": reader(
            "Page views not counted so far, every site together, by reason (what an empty dashboard shows).", [],
            json_answer("The counts over every kept day.", ref("Dropped")))},
        "/api/current-visitors": {"get": reader("Distinct visitors in the last five minutes.", [DOMAIN_PARAM],
                                                json_answer("The count.", ref("CurrentVisitors")))},
        "/api/export": {"get": reader("CSV export.", [
            DOMAIN_PARAM,
            {**query("from", "First day, YYYY-MM-DD.", DAY), "required": True},
            {**query("to", "Last day, YYYY-MM-DD.", DAY), "required": True},
            query("table", "daily (default), pages, sources, a list of /api/stats by day (countries, browsers, "
                  "os, devices, utm_sources, utm_mediums, utm_campaigns, entry_pages, exit_pages: the value, page "
                  "views, visitors, visits and bounces; an unknown value is empty), events (per day and name: "
                  "events, visitors) or event_properties (per day, name, property and value: events).",
                  {"enum": list(stats.EXPORT_TABLES)}),
        ], {"description": "CSV with a header row.", "content": {"text/csv": {"schema": {"type": "string"}}},
            "headers": {"Content-Disposition": header("attachment; filename=...", True)}})},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {
            "200": json_answer("The OpenAPI document.", {"type": "object"}), "500": INTERNAL}}},
    }


PARSER_400 = "A request the HTTP parser refuses (request line over 4 KiB, a header field over 8 KiB, more than 64 " \
    "headers, malformed syntax) gets a short text/plain reason and the connection is closed."


def with_parser_refusals(paths: dict[str, Any]) -> dict[str, Any]:
    """Any request can be refused by the HTTP parser before the app sees it: a text/plain 400."""
    for item in paths.values():
        for operation in item.values():
            responses = operation["responses"]
            answer = responses.setdefault("400", {"description": PARSER_400, "content": {}})
            if answer["description"] != PARSER_400:
                answer["description"] += " Or: " + PARSER_400[0].lower() + PARSER_400[1:]
            answer["content"]["text/plain"] = {"schema": {"type": "string"}}
    return paths


def document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flow-analytics-collector",
            "version": version,
            "description": "A privacy-first web analytics collector. Every error the app answers is JSON "
            "{\"status\": N, \"error\": \"...\"}: 404 for an unknown path, 405 for a method a path does not "
            "take (with Allow). A request the HTTP parser refuses (a request line over 4 KiB, a header field "
            "over 8 KiB, more than 64 headers, malformed syntax) gets a short text/plain 400 and the "
            "connection is closed. Every answer carries X-Content-Type-Options: nosniff, a Referrer-Policy "
            "and a Content-Security-Policy.",
        },
        "paths": with_parser_refusals(copy.deepcopy(paths())),  # the shared answers are not to be changed
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                "MethodNotAllowed": error("The path does not take this method.",
                                          {"Allow": header("The methods it takes.", True)}),
                "NotFound": NOT_FOUND,
            },
            "securitySchemes": {
                "statsToken": {"type": "http", "scheme": "bearer",
                               "description": "STATS_TOKEN; without it, only loopback clients are answered."},
                "transformerSecret": {"type": "apiKey", "in": "header", "name": "X-Secret"},
            },
        },
    }


def handler(version: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /openapi.json: the document, serialized once."""
    body = json.dumps(document(version), indent=1).encode("utf-8")

    async def serve_openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON, headers={"Cache-Control": "no-cache"})

    return serve_openapi


# -- Swagger UI -------------------------------------------------------------------------------------

# The two files of Swagger UI the page at /swagger loads, from the optional `swagger` extra
# (swagger-ui-bundle-v2); the page and its few lines of set-up are static/swagger*.
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")


def swagger_ui_dir() -> Path | None:
    """Where the installed Swagger UI's files are, or None without the `swagger` extra."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(str(swagger_ui_bundle.swagger_ui_path))
