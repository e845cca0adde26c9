"""``INFERQ_AMQP_URL`` with a cluster's nodes: parsing, the per-process order, and what errors say."""

from __future__ import annotations

import random

import pytest

from inferq.shared.broker.connection import Endpoints, broker_urls
from inferq.shared.config.settings import InferqSettings, load_settings
from inferq.shared.errors import ConfigError

NODES = [f"amqp://inferq:pw@rabbit-{i}:5672/%2F" for i in range(3)]


def test_several_urls_separated_by_commas_are_the_cluster_nodes() -> None:
    settings = InferqSettings(amqp_url=" , ".join(NODES) + ",")
    assert settings.amqp_urls == NODES


def test_a_single_url_is_a_one_node_list() -> None:
    assert InferqSettings(amqp_url=NODES[0]).amqp_urls == NODES[:1]


def test_each_url_must_be_amqp_and_the_error_never_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_AMQP_URL", f"{NODES[0]},http://inferq:s3cret@rabbit-9:15672")
    with pytest.raises(ConfigError, match="each comma-separated URL must start with amqp://") as error:
        load_settings(InferqSettings)
    assert "s3cret" not in str(error.value)


def test_processes_start_on_different_nodes_but_an_unshuffled_list_keeps_its_order() -> None:
    settings = InferqSettings(amqp_url=",".join(NODES))
    firsts = {broker_urls(settings, random.Random(seed))[0] for seed in range(30)}
    assert firsts == set(NODES), "a fleet spreads over every node"
    assert sorted(broker_urls(settings, random.Random(1))) == NODES, "every node, each once"
    pinned = InferqSettings(amqp_url=",".join(NODES), amqp_shuffle=False)
    assert broker_urls(pinned) == NODES


def test_attempts_go_round_the_nodes_and_messages_mask_every_password() -> None:
    endpoints = Endpoints(InferqSettings(amqp_url=",".join(NODES), amqp_shuffle=False), "test")
    addresses = [endpoints.next().address for _ in range(4)]
    assert addresses == ["rabbit-0:5672", "rabbit-1:5672", "rabbit-2:5672", "rabbit-0:5672"]
    assert "pw" not in endpoints.shown and endpoints.shown.count("***") == 3
