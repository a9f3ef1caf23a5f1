"""The Flowcore manifests name the wire contract the collector speaks."""

from __future__ import annotations

from pathlib import Path

import yaml

from pathways import VISITOR_TRACKED, VISITOR_TRACKED_V1

EVENT_TYPES = [VISITOR_TRACKED.event_type, VISITOR_TRACKED_V1.event_type]

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / name).read_text())  # type: ignore[no-any-return]


def test_the_data_core_flow_type_and_event_type_match_the_contract() -> None:
    manifest = load("flowcore.yaml")
    data_core = manifest["dataCore"]
    assert data_core["name"] == "flow-analytics" and data_core["description"]
    flow_type = data_core["flowTypes"][VISITOR_TRACKED.flow_type]
    assert flow_type["description"]
    assert list(flow_type["eventTypes"]) == EVENT_TYPES
    assert all(flow_type["eventTypes"][name]["description"] for name in EVENT_TYPES)
    assert VISITOR_TRACKED_V1.flow_type == VISITOR_TRACKED.flow_type


def test_the_scenario_proxies_to_proxy_endpoint() -> None:
    [transformer] = load("flowcore.yaml")["scenario"]["transformers"].values()
    assert (transformer["dataCore"], transformer["flowType"]) == ("flow-analytics", VISITOR_TRACKED.flow_type)
    assert transformer["events"] == EVENT_TYPES
    parameters = {p["name"]: p for p in transformer["parameters"]}
    assert parameters["PROXY_ENDPOINT"]["value"].endswith("/api/transformer")


def test_the_local_development_proxy_endpoint() -> None:
    [endpoint] = load("flowcore.local.development.yaml")["development"]["proxyEndpoints"].values()
    assert (endpoint["dataCore"], endpoint["flowType"]) == ("flow-analytics", VISITOR_TRACKED.flow_type)
    assert endpoint["events"] == EVENT_TYPES


async def test_the_fake_platform_s_data_core_is_the_one_the_manifest_declares() -> None:
    from fake_flowcore import FakeFlowcore

    data_core = load("flowcore.yaml")["dataCore"]
    declared = {f"{flow}/{event}" for flow, spec in data_core["flowTypes"].items() for event in spec["eventTypes"]}
    fake = FakeFlowcore()
    assert (fake.data_core, fake.event_types) == (data_core["name"], declared)
