"""Every engine-like object answers the one ``Backend`` protocol (engine/api.py) with the same call signatures, and
declares what more it can do; the App never guesses from attributes."""

from __future__ import annotations

import inspect

import pytest

from chatkv.engine.api import Backend, BackendCapabilities
from chatkv.engine.engine import Engine
from chatkv.engine.process import EngineProcess
from chatkv.remote.backend import RemoteBackend
from chatkv.runtime import LoadingEngine
from stand_in_engine import StandInEngine

MEMBERS = [name for name in dir(Backend) if not name.startswith("_") and callable(getattr(Backend, name))]
IMPLEMENTATIONS = [Engine, EngineProcess, LoadingEngine, RemoteBackend, StandInEngine]


def parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def test_each_backend_answers_every_call_of_the_protocol_with_its_parameters(implementation) -> None:
    assert {"submit", "cancel", "stats", "until_ready", "close"} <= set(MEMBERS)
    for name in MEMBERS:
        ours, theirs = getattr(Backend, name), getattr(implementation, name)
        # the protocol's parameters come first, by name and default; an implementation may take more, with defaults
        assert parameters(theirs)[: len(parameters(ours))] == parameters(ours), (implementation.__name__, name)
        assert inspect.iscoroutinefunction(theirs) == inspect.iscoroutinefunction(ours), (implementation.__name__, name)
    assert isinstance(implementation.capabilities, BackendCapabilities)


def test_only_a_remote_server_offers_models_and_holds_the_kv_itself() -> None:
    assert RemoteBackend.capabilities == BackendCapabilities(holds_kv=False, server_models=True)
    for local in (Engine, EngineProcess, LoadingEngine):
        assert local.capabilities == BackendCapabilities()
