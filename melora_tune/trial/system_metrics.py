"""The machine's load during a trial, as ``system/<name>`` metrics in the trial's reports.

A trial's MLflow run is written by the search driver's callback, not by the trial's process, so MLflow's own
system-metrics monitor (a thread logging to a run it holds) has nothing to attach to there. Instead the Tune trial
process samples the machine at every report and adds the samples to it; the callback logs them on the trial's
run at the report's step, with MLflow's system-metrics names under ``system/`` (the UI's "System metrics" tab):

- ``cpu_utilization_percentage``: the machine's CPU use averaged since the previous report (psutil);
- ``system_memory_usage_megabytes`` / ``system_memory_usage_percentage``: the machine's memory in use;
- ``process_memory_rss_megabytes``: the trial process's resident memory;
- ``gpu_<i>_memory_usage_megabytes`` / ``gpu_<i>_memory_usage_percentage`` for each visible GPU (torch), and
  ``gpu_<i>_utilization_percentage`` when NVML (nvidia-ml-py) is installed.

Sampling never fails a trial: what cannot be read is left out.
"""

from __future__ import annotations

import logging
from typing import Any

from melora_tune.records import SYSTEM_PREFIX

log = logging.getLogger("melora_tune.trial")

MB = 1024 * 1024


class SystemSampler:
    """``sample()`` -> ``{"system/<name>": value}``; the CPU figure is the average since the previous call (or since
    the sampler was made)."""

    def __init__(self) -> None:
        try:
            import psutil  # optional at run time: without it there are no system metrics

            self._psutil = psutil
            self._process = psutil.Process()
            psutil.cpu_percent(interval=None)  # starts the interval the first sample averages over
        except Exception as exc:  # noqa: BLE001
            log.warning("no system metrics for this trial: %s", exc)
            self._psutil = None
        self._nvml = _nvml()

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            out.update(self._host())
            out.update(self._gpus())
        except Exception as exc:  # noqa: BLE001  (a metric we cannot read is left out, the report goes on)
            log.debug("system metrics: %s", exc)
        return {SYSTEM_PREFIX + k: float(v) for k, v in out.items()}

    def add_to(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The report's metrics with this sample added (a copy)."""
        return {**metrics, **self.sample()}

    def _host(self) -> dict[str, float]:
        if self._psutil is None:
            return {}
        mem = self._psutil.virtual_memory()
        return {
            "cpu_utilization_percentage": self._psutil.cpu_percent(interval=None),
            "system_memory_usage_megabytes": (mem.total - mem.available) / MB,
            "system_memory_usage_percentage": mem.percent,
            "process_memory_rss_megabytes": self._process.memory_info().rss / MB,
        }

    def _gpus(self) -> dict[str, float]:
        import torch  # heavy: torch (already loaded by a training trial)

        out: dict[str, float] = {}
        if not torch.cuda.is_available():
            return out
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out[f"gpu_{i}_memory_usage_megabytes"] = (total - free) / MB
            out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total if total else 0.0
            if self._nvml is not None:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                out[f"gpu_{i}_utilization_percentage"] = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        return out


def _nvml():
    """NVML when nvidia-ml-py is installed and a driver answers, else None (GPU utilisation is then left out)."""
    try:
        import pynvml  # optional: nvidia-ml-py, for GPU utilisation

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001
        return None
