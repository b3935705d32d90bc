"""Run an entry script's ``@hydra.main`` in this process, as the command line would, and leave no Hydra state."""

from __future__ import annotations

import runpy
import sys
from unittest import mock

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT


def hydra_main(script: str, *argv: str) -> None:
    """``python <script>.py <argv>`` in-process: the real Hydra command line, sweeper and launcher.

    Saves the 3-10 s a subprocess spends importing torch; HydraConfig is cleared afterwards so that later in-process
    runs are not mistaken for jobs of this multirun.
    """
    path = ROOT / f"{script}.py"
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            HydraConfig.instance().cfg = None
            GlobalHydra.instance().clear()
