"""What every scenario gets: the model, the settings it starts engines from, the sizes, progress, and the fp32 twin.

Scenarios create their own engines from ``engine_settings`` so each measures a clean engine (fresh
counters, no sessions left by another scenario). The bench never writes into the user's data: engines
run with snapshots off unless a scenario gives them a temporary folder of their own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from chatkv.bench.sizes import Sizes
from chatkv.config import Settings


@dataclass
class BenchContext:
    bundle: Any  # ModelBundle in the dtype being measured
    settings: Settings  # after the config file and flags
    sizes: Sizes
    check: bool  # run the fp32 exactness checks before timing
    progress: Callable[[str], None]
    models_dir: Path
    model_spec: str
    llama_bench: str | None = None  # --llama-bench PATH, for the speed scenario
    _fp32_bundle: Any = field(default=None, repr=False)

    def engine_settings(self, **batching: Any) -> Settings:
        """A copy of the settings for one engine of the bench: snapshots off, batching options as given."""
        settings = copy.deepcopy(self.settings)
        settings.snapshot.enabled = False
        for name, value in batching.items():
            setattr(settings.batching, name, value)
        return settings

    def fp32_bundle(self) -> Any:
        """The same model in fp32 for the exactness checks: the bundle itself when it already is fp32."""
        if self.bundle.dtype == torch.float32:
            return self.bundle
        if self._fp32_bundle is None:
            from chatkv.model.loader import load_model

            self.progress("loading an fp32 copy of the model for the exactness checks")
            self._fp32_bundle = load_model(self.model_spec, self.models_dir, dtype="float32",
                                           device=str(self.bundle.device.type), allow_pull=False)
        return self._fp32_bundle

    def release_fp32_bundle(self) -> None:
        self._fp32_bundle = None
