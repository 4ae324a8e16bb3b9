"""The simulated Metronome that the demo, the tests and the benchmark share (not product code)."""

from .metronome import Fault, RecordedRequest, SimulatedMetronome, main

__all__ = ["Fault", "RecordedRequest", "SimulatedMetronome", "main"]
