"""Discrete-event cluster simulator: the live routing, batching and scaling code on a simulated
clock and a calibrated performance model (docs/sim.md). Torch-free, except `profile.py`'s one
function that runs the real engine."""
