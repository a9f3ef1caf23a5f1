"""The Flowcore manifests name the wire contract the collector speaks."""

from __future__ import annotations

from pathlib import Path

import yaml

from pathways import VISITOR_EVENT, VISITOR_TRACKED, VISITOR_TRACKED_V1

EVENT_TYPES = [VISITOR_TRACKED.event_type, VISITOR_TRACKED_V1.event_type, VISITOR_EVENT.event_type]

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
    assert VISITOR_EVENT.flow_type == VISITOR_TRACKED.flow_type


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


def test_the_local_development_manifest_leaves_the_tenant_to_flowcore_yaml() -> None:
    """The CLI merges the files it is given, a later one overriding an earlier one: a tenant here
    would replace the one set in flowcore.yaml."""
    assert set(load("flowcore.local.development.yaml")) == {"development"}


def test_the_scale_out_scenario_has_one_transformer_per_collector_each_with_its_own_endpoint() -> None:
    manifest = load("flowcore.scale-out.yaml")
    single = load("flowcore.yaml")
    assert manifest["tenant"] == single["tenant"] and "dataCore" not in manifest
    transformers = list(manifest["scenario"]["transformers"].values())
    assert len(transformers) >= 2
    endpoints = []
    [reference] = single["scenario"]["transformers"].values()
    for transformer in transformers:
        assert (transformer["dataCore"], transformer["flowType"]) == ("flow-analytics", VISITOR_TRACKED.flow_type)
        assert transformer["events"] == EVENT_TYPES
        parameters = {p["name"]: p for p in transformer["parameters"]}
        assert parameters["PROXY_HEADER_SECRET"] == {p["name"]: p for p in reference["parameters"]}[
            "PROXY_HEADER_SECRET"]
        assert transformer["blueprint"] == reference["blueprint"]
        endpoints.append(parameters["PROXY_ENDPOINT"]["value"])
    assert all(url.endswith("/api/transformer") for url in endpoints)
    assert len(set(endpoints)) == len(endpoints)  # each collector's own address


def test_the_docs_create_the_organisation_secret_that_the_scenarios_name() -> None:
    [transformer] = load("flowcore.yaml")["scenario"]["transformers"].values()
    secret = {p["name"]: p for p in transformer["parameters"]}["PROXY_HEADER_SECRET"]["value"]
    docs = (ROOT / "docs" / "flowcore.md").read_text()
    assert f"flowcore auth new secret --tenant your-tenant {secret} \\" in docs
    assert f"flowcore auth new secret --tenant your-tenant {secret} \\" in (ROOT / "flowcore.yaml").read_text()


async def test_the_fake_platform_s_data_core_is_the_one_the_manifest_declares() -> None:
    from fake_flowcore import FakeFlowcore

    data_core = load("flowcore.yaml")["dataCore"]
    declared = frozenset(f"{flow}/{event}" for flow, spec in data_core["flowTypes"].items()
                         for event in spec["eventTypes"])
    fake = FakeFlowcore()
    assert (fake.data_core, fake.event_types) == (data_core["name"], declared)
