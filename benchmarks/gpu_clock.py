"""The GPU's SM clock while a benchmark times its cases, sampled through NVML
(`pip install nvidia-ml-py`) on a background thread.

An H200 lowers its SM clock under sustained load (power and temperature), so two cases
timed a minute apart may run at different clocks. Benchmarks that interleave rounds
report each case's median clock beside its time, so that such a drift is seen rather
than read as a kernel's speed.

    sampler = ClockSampler()         # None-like (`available` False) without NVML or a GPU
    start = time.perf_counter(); ...; end = time.perf_counter()
    sampler.median_mhz(start, end)   # the SM clock's median between the two, or None
"""

import statistics
import threading
import time


class ClockSampler:
    """Samples GPU `index`'s SM clock (MHz) every `every_s` seconds until `close`."""

    def __init__(self, index=0, every_s=0.01):
        self.samples = []  # (time.perf_counter(), MHz)
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            read = lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
            read()
        except Exception:  # no NVML library, no NVIDIA GPU or no driver: no clocks
            return
        self._thread = threading.Thread(target=self._run, args=(read, every_s), daemon=True)
        self._thread.start()

    @property
    def available(self):
        return self._thread is not None

    def _run(self, read, every_s):
        while not self._stop.wait(every_s):
            self.samples.append((time.perf_counter(), read()))

    def median_mhz(self, start, end):
        """The median SM clock sampled between `time.perf_counter()` readings `start`
        and `end`; None without samples there."""
        inside = [mhz for t, mhz in list(self.samples) if start <= t <= end]
        return statistics.median(inside) if inside else None

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
