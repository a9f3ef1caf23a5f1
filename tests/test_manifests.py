"""The Flowcore manifests name the wire contract the collector speaks."""

from __future__ import annotations

from pathlib import Path

import yaml

from pathways import VISITOR_EVENT, VISITOR_TRACKED

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / name).read_text())  # type: ignore[no-any-return]


def test_the_data_core_flow_type_and_event_type_match_the_contract() -> None:
    manifest = load("flowcore.yaml")
    data_core = manifest["dataCore"]
    assert data_core["name"] == "flow-analytics" and data_core["description"]
    flow_type = data_core["flowTypes"][VISITOR_TRACKED.flow_type]
    assert flow_type["description"]
    for contract in (VISITOR_TRACKED, VISITOR_EVENT):
        assert contract.flow_type == VISITOR_TRACKED.flow_type
        assert flow_type["eventTypes"][contract.event_type]["description"]


def test_the_scenario_proxies_to_proxy_endpoint() -> None:
    [transformer] = load("flowcore.yaml")["scenario"]["transformers"].values()
    assert (transformer["dataCore"], transformer["flowType"]) == ("flow-analytics", VISITOR_TRACKED.flow_type)
    assert transformer["events"] == [VISITOR_TRACKED.event_type, VISITOR_EVENT.event_type]
    parameters = {p["name"]: p for p in transformer["parameters"]}
    assert parameters["PROXY_ENDPOINT"]["value"].endswith("/api/transformer")


def test_the_local_development_proxy_endpoint() -> None:
    [endpoint] = load("flowcore.local.development.yaml")["development"]["proxyEndpoints"].values()
    assert (endpoint["dataCore"], endpoint["flowType"]) == ("flow-analytics", VISITOR_TRACKED.flow_type)
    assert endpoint["events"] == [VISITOR_TRACKED.event_type, VISITOR_EVENT.event_type]
